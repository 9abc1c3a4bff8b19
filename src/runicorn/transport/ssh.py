"""Open an SSH connection the way ``ssh`` would, but never trust a host key silently and never
ask for a password.

``connect()`` resolves a destination through ``~/.ssh/config`` (HostName, User, Port,
IdentityFile, IdentitiesOnly, UserKnownHostsFile, GlobalKnownHostsFile, ProxyCommand,
Compression), loads
the system and user known_hosts files, and authenticates with the agent and key files only.
An unknown host key raises :class:`UnknownHostKeyError` and a changed one
:class:`ChangedHostKeyError`; both say which fingerprint was seen and how to trust it after
checking. A run from cron or a systemd timer therefore fails fast instead of hanging on a
prompt, and a man-in-the-middle is refused rather than remembered.

Compression is chosen per connection (:mod:`runicorn.transport.link`): asked for, else the
ssh config's ``Compression``, else automatic -- offered in the key exchange, and re-keyed off
when the round trip shows a fast local link (a millisecond or two on a LAN, where the re-key
costs that much again). A connection for a first sync, whose files the file stream compresses,
does not offer it at all (``connect(carrier="stream")``): the re-key that would hand it to the
stream costs a key exchange (about three round trips) before the first file.
:func:`compression_choice` tells what was chosen.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import shlex
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn

import paramiko

from runicorn.transport import openssh_shortcuts, paramiko_import
from runicorn.transport.link import (
    CompressionChoice,
    LinkMeasurement,
    choose_compression,
    parse_config_compression,
)

__all__ = [
    "AEAD_CIPHERS",
    "DEFAULT_SSH_CONFIG",
    "DEFAULT_TIMEOUT",
    "SYSTEM_KNOWN_HOSTS",
    "ChangedHostKeyError",
    "HostKeyError",
    "ResolvedHost",
    "SshAuthenticationError",
    "SshConfigError",
    "UnknownHostKeyError",
    "compression_choice",
    "connect",
    "fingerprint",
    "hand_compression_to_stream",
    "parse_destination",
    "resolve_host",
    "take_compression_back",
    "transport_compression",
]

logger = logging.getLogger(__name__)

DEFAULT_SSH_CONFIG = "~/.ssh/config"
DEFAULT_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
SYSTEM_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
DEFAULT_TIMEOUT = 30.0
SSH_PORT = 22


class SshConfigError(ValueError):
    """The destination or the ssh configuration asks for something this client cannot do."""


class HostKeyError(paramiko.SSHException):
    """The server's host key is not trusted; nothing was sent to it beyond the key exchange."""

    def __init__(self, message: str, *, host: str, port: int, key: paramiko.PKey) -> None:
        super().__init__(message)
        self.host = host
        self.port = port
        self.key_type = key.get_name()
        self.fingerprint = fingerprint(key)


class UnknownHostKeyError(HostKeyError):
    """No known_hosts file lists a key for this host (first connection)."""


class ChangedHostKeyError(HostKeyError):
    """known_hosts lists a different key of the same type: a reinstall, or an attack."""


class SshAuthenticationError(paramiko.AuthenticationException):
    """No key or agent identity was accepted (passwords are never tried)."""


def fingerprint(key: paramiko.PKey) -> str:
    """The ``SHA256:…`` fingerprint OpenSSH prints (``ssh-keygen -lf``) for a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def parse_destination(destination: str) -> tuple[str | None, str]:
    """Split ``[USER@]HOST`` (``HOST`` may be a bracketed IPv6 address) into (user, host)."""
    user: str | None = None
    host = destination
    if "@" in destination:
        user, host = destination.rsplit("@", 1)
        if not user:
            raise SshConfigError(f"empty user name in {destination!r}; use USER@HOST or HOST")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(ch.isspace() for ch in host) or "/" in host:
        raise SshConfigError(f"{destination!r} is not a valid [USER@]HOST destination")
    return user, host


@dataclass
class ResolvedHost:
    """Everything ``connect()`` needs, after ``~/.ssh/config`` and the arguments are merged."""

    alias: str
    hostname: str
    port: int
    username: str
    identity_files: list[str] = field(default_factory=list)
    identities_only: bool = False
    user_known_hosts: list[str] = field(default_factory=list)
    system_known_hosts: list[str] = field(default_factory=list)
    proxy_command: str | None = None
    compression: bool | None = None
    """``Compression`` from the ssh config (None: not set there)."""

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts files list this server under (``[host]:port`` off port 22)."""
        return self.hostname if self.port == SSH_PORT else f"[{self.hostname}]:{self.port}"


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _split_files(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [_expand(part) for part in shlex.split(value)]
    return [_expand(part) for item in value for part in shlex.split(item)]


def _load_config(config_path: str | os.PathLike[str] | None) -> paramiko.SSHConfig | None:
    if config_path is None:
        return None
    path = Path(_expand(os.fspath(config_path)))
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise SshConfigError(f"cannot read ssh config {path}: {error}") from error
    if "exec" in text.lower():
        paramiko_import.allow_match_exec()  # a Match exec may need invoke
    try:
        return paramiko.SSHConfig.from_text(text)
    except paramiko.ConfigParseError as error:
        raise SshConfigError(f"cannot read ssh config {path}: {error}") from error


def _local_username() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER") or os.environ.get("USERNAME") or "root"


def resolve_host(
    destination: str,
    *,
    port: int | None = None,
    config_path: str | os.PathLike[str] | None = DEFAULT_SSH_CONFIG,
    known_hosts: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    identity_files: Iterable[str | os.PathLike[str]] = (),
    system_known_hosts: Sequence[str] | None = SYSTEM_KNOWN_HOSTS,
) -> ResolvedHost:
    """Merge the destination, the explicit arguments and the ssh config, as ``ssh`` does.

    Explicit arguments win over the config (``-p`` over ``Port``); the config wins over
    defaults. ``known_hosts`` replaces the user known_hosts files (``UserKnownHostsFile``).
    """
    user, alias = parse_destination(destination)
    config = _load_config(config_path)
    options = config.lookup(alias) if config is not None else {"hostname": alias}
    if options.get("proxyjump"):
        raise SshConfigError(
            f"ProxyJump (for {alias}) is not supported; use an equivalent ProxyCommand such as "
            f"'ProxyCommand ssh -W %h:%p {options['proxyjump']}'"
        )
    strict = str(options.get("stricthostkeychecking", "")).lower()
    if strict in ("no", "off", "accept-new"):
        logger.warning(
            "StrictHostKeyChecking %s in the ssh config is ignored: runicorn never trusts a "
            "host key that is not in known_hosts",
            strict,
        )
    try:
        resolved_port = port if port is not None else int(options.get("port", SSH_PORT))
    except ValueError:
        raise SshConfigError(f"Port {options.get('port')!r} for {alias} is not a number") from None
    if not 0 < resolved_port < 65536:
        raise SshConfigError(f"port {resolved_port} is outside 1..65535")

    identities = [_expand(os.fspath(path)) for path in identity_files]
    identities += [path for path in _split_files(options.get("identityfile"))]
    if known_hosts is not None:
        if isinstance(known_hosts, str | os.PathLike):
            user_files = [_expand(os.fspath(known_hosts))]
        else:
            user_files = [_expand(os.fspath(path)) for path in known_hosts]
    else:
        user_files = _split_files(options.get("userknownhostsfile")) or [
            _expand(path) for path in DEFAULT_USER_KNOWN_HOSTS
        ]
    if "globalknownhostsfile" in options:
        system_files = _split_files(options["globalknownhostsfile"])
    else:
        system_files = list(system_known_hosts or ())
    proxy = options.get("proxycommand")
    try:
        compression = parse_config_compression(options.get("compression"))
    except ValueError as error:
        raise SshConfigError(f"{error} (for {alias})") from None
    return ResolvedHost(
        alias=alias,
        hostname=options.get("hostname", alias),
        port=resolved_port,
        username=user or options.get("user") or _local_username(),
        identity_files=list(dict.fromkeys(identities)),
        identities_only=str(options.get("identitiesonly", "no")).lower() == "yes",
        user_known_hosts=user_files,
        system_known_hosts=system_files,
        proxy_command=None if proxy in (None, "none") else proxy,
        compression=compression,
    )


class _RefuseUnknownHostKey(paramiko.MissingHostKeyPolicy):
    """Like ``RejectPolicy``, but the exception says what was seen and how to trust it."""

    def __init__(self, resolved: ResolvedHost) -> None:
        self.resolved = resolved

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        resolved = self.resolved
        known_types = _known_key_types(resolved, hostname)
        also = (
            f" (known_hosts has a key of another type for it: {', '.join(known_types)}; "
            "the server did not offer that one)"
            if known_types
            else ""
        )
        raise UnknownHostKeyError(
            f"the host key of {hostname} is not known{also}. The server offered "
            f"{key.get_name()} {fingerprint(key)}. runicorn never trusts a new host key on "
            "its own: confirm this fingerprint with the server's administrator (on the server: "
            "`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), then add it with\n"
            f"    {_keyscan_command(resolved, key)}\n"
            "or connect once with plain `ssh` and answer yes after comparing the fingerprint.",
            host=resolved.hostname,
            port=resolved.port,
            key=key,
        )


def _known_key_types(resolved: ResolvedHost, hostname: str) -> list[str]:
    """Key types the known_hosts files list for ``hostname`` (for the error message only)."""
    known = paramiko.HostKeys()
    for path in [*resolved.system_known_hosts, *resolved.user_known_hosts]:
        if os.path.isfile(path):
            with contextlib.suppress(OSError, paramiko.SSHException):
                known.load(path)
    entry = known.lookup(hostname)
    return sorted(entry.keys()) if entry is not None else []


def _keyscan_command(resolved: ResolvedHost, key: paramiko.PKey) -> str:
    target = resolved.user_known_hosts[0] if resolved.user_known_hosts else "~/.ssh/known_hosts"
    home = os.path.expanduser("~")
    if target.startswith(home + os.sep):
        target = "~" + target[len(home) :]
    key_type = key.get_name().removeprefix("ssh-").split("-")[0]
    if key_type.startswith("ecdsa"):
        key_type = "ecdsa"
    port = f"-p {resolved.port} " if resolved.port != SSH_PORT else ""
    return f"ssh-keyscan {port}-t {key_type} {shlex.quote(resolved.hostname)} >> {target}"


def _changed_key_error(
    resolved: ResolvedHost, error: paramiko.BadHostKeyException
) -> ChangedHostKeyError:
    name = resolved.known_hosts_name
    return ChangedHostKeyError(
        f"WARNING: THE HOST KEY OF {name} HAS CHANGED. known_hosts says "
        f"{error.expected_key.get_name()} {fingerprint(error.expected_key)}, the server offered "
        f"{error.key.get_name()} {fingerprint(error.key)}. Someone could be intercepting the "
        "connection (man-in-the-middle), or the server was reinstalled. runicorn refuses to "
        "connect. If the change is expected and you have verified the new fingerprint with "
        f"the server's administrator, remove the old key with `ssh-keygen -R '{name}'` and "
        f"add the new one with\n    {_keyscan_command(resolved, error.key)}",
        host=resolved.hostname,
        port=resolved.port,
        key=error.key,
    )


def _load_known_hosts(client: paramiko.SSHClient, resolved: ResolvedHost) -> None:
    """System files first, then user files; all read-only (nothing is ever saved back)."""
    for path in [*resolved.system_known_hosts, *resolved.user_known_hosts]:
        if not os.path.isfile(path):
            continue
        try:
            client.load_system_host_keys(path)
        except (OSError, paramiko.SSHException) as error:
            logger.warning("known_hosts file %s could not be read: %s", path, error)


AEAD_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
"""Offered first: one AES-GCM pass per packet instead of AES-CTR plus an HMAC, so paramiko's
client spends less CPU on the same download (``benchmarks/bench_ciphers.py``), which a cold
sync needs on a busy machine. A server without them gets paramiko's usual order."""


def _make_transport(*args: Any, **kwargs: Any) -> paramiko.Transport:
    """``SSHClient.connect``'s transport factory: the class :mod:`.openssh_shortcuts` picks,
    with AES-GCM offered first (through the public ``SecurityOptions``)."""
    transport = openssh_shortcuts.transport_class()(*args, **kwargs)
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    first = tuple(name for name in AEAD_CIPHERS if name in offered)
    options.ciphers = (*first, *(name for name in offered if name not in first))
    return transport


def _tcp_connect(host: str, port: int, timeout: float) -> tuple[socket.socket, float]:
    """A connected TCP socket with Nagle's algorithm off, and the seconds the connect took.

    SSH writes each packet separately; with Nagle on, a packet that follows another before
    its ACK (a key exchange step, pipelined SFTP requests) waits for that ACK. ``ssh`` sets
    TCP_NODELAY for interactive sessions for the same reason.
    """
    try:
        started = time.monotonic()
        sock = socket.create_connection((host, port), timeout=timeout)
        took = time.monotonic() - started
    except socket.gaierror as error:
        raise OSError(f"cannot resolve {host}: {error}") from error
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock, took


_CHOICES: weakref.WeakKeyDictionary[paramiko.Transport, CompressionChoice] = (
    weakref.WeakKeyDictionary()
)


_CONFIRMING: weakref.WeakKeyDictionary[paramiko.Transport, threading.Thread] = (
    weakref.WeakKeyDictionary()
)

CONFIRM_PROBES = 3
"""Keepalive requests that check a long key exchange in the background (the first fast
answer turns compression off; on a long link they cost no wait, only a few tiny packets)."""


def compression_choice(
    client: paramiko.SSHClient, *, wait: float = 5.0
) -> CompressionChoice | None:
    """What :func:`connect` chose for this connection's compression (None: another client).

    Waits up to ``wait`` seconds for the background check of an automatic "on" to end, so
    the answer is final (it ends a few round trips after the connection is up).
    """
    transport = client.get_transport()
    if transport is None:
        return None
    checking = _CONFIRMING.get(transport)
    if checking is not None:
        checking.join(wait)
    return _CHOICES.get(transport)


def transport_compression(
    transport: paramiko.Transport, *, wait: float = 5.0
) -> CompressionChoice | None:
    """:func:`compression_choice` for a transport (None: not opened by :func:`connect`)."""
    checking = _CONFIRMING.get(transport)
    if checking is not None:
        checking.join(wait)
    return _CHOICES.get(transport)


def hand_compression_to_stream(transport: paramiko.Transport) -> bool:
    """Whether the file stream should compress, given this connection's choice; when it
    should, SSH compression is re-keyed off first (no double work) and the choice records
    that the stream carries it (a connection opened with ``carrier="stream"`` has no SSH
    compression to turn off).

    False when compression is not wanted, when the connection was not opened by
    :func:`connect`, or on plain paramiko (``RUNICORN_OPENSSH_SHORTCUTS=0``), which cannot
    re-key compression off cleanly: SSH then keeps compressing what the stream sends."""
    choice = transport_compression(transport)
    if choice is None or not choice.enabled:
        return False
    if choice.carrier == "stream":
        return True
    if not isinstance(transport, openssh_shortcuts.ClientTransport):
        return False
    choice = _turn_off(transport, choice)
    _CHOICES[transport] = replace(choice, carrier="stream")
    logger.info("%s", _CHOICES[transport].describe())
    return True


def take_compression_back(transport: paramiko.Transport) -> bool:
    """SSH compression re-keyed on for a connection whose compression the file stream was to
    carry, when the stream cannot run and SFTP carries the files instead; whether it is on.

    A re-key (about three round trips): worth it for the files of a sync that would
    otherwise cross the link uncompressed. Nothing happens when compression is not wanted,
    SSH compresses already, or the connection was not opened by :func:`connect`."""
    choice = transport_compression(transport)
    if choice is None or not choice.enabled or choice.carrier != "stream":
        return False
    if not isinstance(transport, openssh_shortcuts.ClientTransport):
        return False
    if _server_compression(transport) == "none":
        transport.use_compression(True)
        transport.renegotiate_keys()
    choice = replace(choice, carrier="ssh", negotiated=_server_compression(transport))
    _CHOICES[transport] = choice
    logger.info("%s; the file stream did not run", choice.describe())
    return choice.active


def _measure_link(transport: paramiko.Transport, tcp_rtt: float | None) -> LinkMeasurement | None:
    """The key exchange's round trip, or the TCP connect's under plain paramiko."""
    if not isinstance(transport, openssh_shortcuts.ClientTransport):
        return None if tcp_rtt is None else LinkMeasurement(tcp_rtt, "tcp connect")
    rtt = transport.kex_round_trip
    return None if rtt is None else LinkMeasurement(rtt, "handshake")


def _server_compression(transport: paramiko.Transport) -> str:
    """The compression agreed for what the server sends (absent from paramiko's stubs)."""
    return str(getattr(transport, "remote_compression", None) or "none")


def _turn_off(transport: paramiko.Transport, choice: CompressionChoice) -> CompressionChoice:
    if _server_compression(transport) != "none":
        transport.use_compression(False)
        transport.renegotiate_keys()
    return replace(choice, negotiated=_server_compression(transport))


def _settle_compression(
    transport: paramiko.Transport,
    requested: bool | None,
    config_value: bool | None,
    tcp_rtt: float | None,
    carrier: Literal["ssh", "stream"] = "ssh",
) -> CompressionChoice:
    """Decide with what the connection measured; re-key compression off at once when that is
    the automatic choice (it was offered while the link was unknown). With ``carrier``
    ``"stream"`` (nothing was offered) the choice says whether the file stream compresses.

    A key exchange is one sample of the round trip, and a busy client or server stretches it
    (a stall of tens of milliseconds on a loaded machine makes a LAN look far away). So an
    automatic "on" is checked with :data:`CONFIRM_PROBES` keepalive requests on a thread,
    while the sync starts: one fast answer re-keys compression off. Sent before any file
    moves, on a LAN that answer comes back within a millisecond or two.
    """
    automatic = requested is None and config_value is None
    link = _measure_link(transport, tcp_rtt)
    choice = choose_compression(requested, config_value, link, carrier)
    if not choice.enabled:
        choice = _turn_off(transport, choice)
    else:
        choice = replace(choice, negotiated=_server_compression(transport))
    _CHOICES[transport] = choice
    logger.info("%s", choice.describe())
    if not isinstance(transport, openssh_shortcuts.ClientTransport):
        return choice
    if automatic and choice.active:
        checking = threading.Thread(
            target=_confirm_long_link,
            args=(transport, choice),
            name="runicorn-link-check",
            daemon=True,
        )
        _CONFIRMING[transport] = checking
        checking.start()
    else:
        transport.stop_timing()
    return choice


def _confirm_long_link(transport: paramiko.Transport, choice: CompressionChoice) -> None:
    """Probe the round trip a few times; re-key compression off if the link was fast."""
    assert isinstance(transport, openssh_shortcuts.ClientTransport)
    shortest = choice.link.rtt if choice.link is not None else float("inf")
    try:
        for _ in range(CONFIRM_PROBES):
            if not transport.is_active():
                return
            shortest = min(shortest, transport.probe_round_trip())
            link = LinkMeasurement(shortest, "handshake")
            decided = choose_compression(None, None, link)
            if not decided.enabled:
                _CHOICES[transport] = _turn_off(transport, decided)
                logger.info("%s; the key exchange had taken longer", decided.describe())
                return
            _CHOICES[transport] = replace(choice, link=link)
    except (paramiko.SSHException, OSError, EOFError) as error:
        logger.debug("link check ended early: %s", error)
    finally:
        transport.stop_timing()


def connect(
    destination: str,
    *,
    port: int | None = None,
    config_path: str | os.PathLike[str] | None = DEFAULT_SSH_CONFIG,
    known_hosts: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    identity_files: Iterable[str | os.PathLike[str]] = (),
    timeout: float = DEFAULT_TIMEOUT,
    allow_agent: bool = True,
    system_known_hosts: Sequence[str] | None = SYSTEM_KNOWN_HOSTS,
    compress: bool | None = None,
    carrier: Literal["ssh", "stream"] = "ssh",
) -> paramiko.SSHClient:
    """Connect to ``[USER@]HOST`` with verified host key and key-based authentication.

    ``compress``: True or False asks for SSH compression or refuses it (``ssh -C`` / ``-o
    Compression=no``); None (the default) follows ``Compression`` in the ssh config, else
    decides from the link's round trip (:func:`runicorn.transport.link.choose_compression`).
    :func:`compression_choice` on the returned client tells what was chosen and why.

    ``carrier``: ``"stream"`` when the caller will fetch its files through the file stream
    (a first sync), which compresses them itself: SSH compression is then not offered in
    the key exchange, and the choice (made as above) is the stream's, with no re-key to
    hand it over; :func:`take_compression_back` gives it to SSH if the stream cannot run.
    Plain paramiko (``RUNICORN_OPENSSH_SHORTCUTS=0``) cannot time the handshake: there it
    is ignored.

    Raises :class:`UnknownHostKeyError` / :class:`ChangedHostKeyError` (host key not
    trusted), :class:`SshAuthenticationError` (no key accepted), :class:`SshConfigError`
    (bad destination or config) and ``OSError`` / ``paramiko.SSHException`` for network
    failures. Every wait (TCP connect, banner, authentication, channel open) is bounded by
    ``timeout``. Passwords and keyboard-interactive prompts are never used.
    """
    resolved = resolve_host(
        destination,
        port=port,
        config_path=config_path,
        known_hosts=known_hosts,
        identity_files=identity_files,
        system_known_hosts=system_known_hosts,
    )
    client = paramiko.SSHClient()
    _load_known_hosts(client, resolved)
    client.set_missing_host_key_policy(_RefuseUnknownHostKey(resolved))
    key_files = [path for path in resolved.identity_files if os.path.isfile(path)]
    for path in resolved.identity_files:
        if path not in key_files:
            logger.debug("identity file %s does not exist; skipped", path)
    use_agent = allow_agent and not resolved.identities_only
    look_for_keys = not resolved.identities_only
    # paramiko's SSHConfig already expanded %h/%p/%r in ProxyCommand.
    tcp_rtt: float | None = None
    if resolved.proxy_command:
        sock: Any = paramiko.ProxyCommand(resolved.proxy_command)
    else:
        sock, tcp_rtt = _tcp_connect(resolved.hostname, resolved.port, timeout)
    fixed = compress if compress is not None else resolved.compression
    if carrier == "stream" and not openssh_shortcuts.environment_allows():
        carrier = "ssh"  # plain paramiko: decided before the handshake, as below
    if carrier == "stream":
        offer = False  # the file stream compresses; the handshake still times the link
    elif fixed is not None:
        offer = fixed
    elif openssh_shortcuts.environment_allows():
        offer = True  # the key exchange times the link; a fast one is re-keyed off
    else:
        # Plain paramiko cannot time the key exchange or re-key compression off cleanly:
        # decide before it from the TCP handshake (which a local proxy hides).
        offer = choose_compression(None, None, _tcp_link(tcp_rtt)).enabled
    logger.debug(
        "connecting to %s@%s:%d (keys: %s, agent: %s, default keys: %s)",
        resolved.username,
        resolved.hostname,
        resolved.port,
        key_files or "none",
        use_agent,
        look_for_keys,
    )
    try:
        client.connect(
            resolved.hostname,
            port=resolved.port,
            username=resolved.username,
            key_filename=key_files or None,  # type: ignore[arg-type]  # a list works too
            allow_agent=use_agent,
            look_for_keys=look_for_keys,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            sock=sock,
            transport_factory=_make_transport,
            compress=offer,
        )
    except paramiko.BadHostKeyException as error:
        client.close()
        raise _changed_key_error(resolved, error) from None
    except HostKeyError:
        client.close()
        raise
    except paramiko.AuthenticationException as error:
        client.close()
        tried = ", ".join(key_files) or "no key files"
        raise SshAuthenticationError(
            f"authentication as {resolved.username}@{resolved.hostname}:{resolved.port} failed "
            f"({error}); tried {tried}{', the SSH agent' if use_agent else ''}"
            f"{' and the default keys in ~/.ssh' if look_for_keys else ''}. runicorn never "
            "asks for a password: install your public key on the server (`ssh-copy-id`) or "
            "pass the right one with --identity"
        ) from None
    except BaseException:
        client.close()
        raise
    transport = client.get_transport()
    if transport is not None:
        # A re-key (compression turned off, or paramiko's own after 1 GB) holds every send
        # until it completes: bounded by the caller's timeout, not paramiko's 30 s.
        transport.clear_to_send_timeout = timeout
        try:
            _settle_compression(transport, compress, resolved.compression, tcp_rtt, carrier)
        except BaseException:
            client.close()
            raise
        transport.set_keepalive(15)
    return client


def _tcp_link(tcp_rtt: float | None) -> LinkMeasurement | None:
    return None if tcp_rtt is None else LinkMeasurement(tcp_rtt, "tcp connect")
