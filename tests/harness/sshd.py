"""A throw-away OpenSSH server on 127.0.0.1 for tests and benchmarks.

The sync client must be proven against a real ``sshd`` (host-key checks, channel limits, the real
``sftp-server``), and its request budget must be measured on the server side rather than trusted
from the client. :class:`SshServer` starts a private ``sshd`` with fresh keys in a temporary
directory and, in counting mode, runs every SFTP session through ``sftp-server -l DEBUG3`` so the
``request N: <type>`` lines it logs can be counted.

Usage::

    with SshServer(count_requests=True) as server:
        client = server.connect()
        sftp = client.open_sftp()
        server.reset_request_counts()
        sftp.stat("/etc/hostname")
        assert server.sftp_request_count().by_type == {"stat": 1}
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "DEFAULT_SFTP_SERVER",
    "SftpRequestCounts",
    "SshServer",
    "SshServerError",
    "find_sftp_server",
    "find_sshd",
]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_SFTP_SERVER = "/usr/lib/openssh/sftp-server"
_SBIN_PATH = "/usr/sbin:/usr/local/sbin:/sbin:/usr/bin:/usr/local/bin:/bin"
_INSTALL_HINT = "install openssh-server (Debian/Ubuntu: apt-get install -y openssh-server)"
# Levels at which sshd logs "Server listening on ..." (an INFO message).
_LISTEN_LOGGED_LEVELS = {"INFO", "VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3"}
_START_ATTEMPTS = 5
_HAVE_PROC = Path("/proc/self").is_dir()

# sftp-server logs each request as it parses it ("debug3: request 7: open flags 1") and each
# reply as "request 7: sent status 0"; only the former are requests.
_REQUEST_RE = re.compile(r"\brequest (\d+): (?!sent\b)([A-Za-z0-9_.@-]+)")
# Markers the wrapper script writes around each sftp-server process.
_SESSION_MARK = "runicorn-sftp-session"
_SESSION_RE = re.compile(rf"^{_SESSION_MARK} (start|end) (\d+)")


class SshServerError(RuntimeError):
    """The throw-away sshd could not be started or did not behave as expected."""


@dataclass(frozen=True)
class SftpRequestCounts:
    """SFTP requests the server logged since the last reset, in total and by request type."""

    total: int
    by_type: Mapping[str, int] = field(default_factory=dict)
    sessions: int = 0  # sftp-server processes started since the reset

    def __getitem__(self, request_type: str) -> int:
        return self.by_type.get(request_type, 0)


def find_sshd() -> str | None:
    """Absolute path of ``sshd`` (it refuses to re-exec from a relative one), or None."""
    return shutil.which("sshd", path=_SBIN_PATH + os.pathsep + os.environ.get("PATH", ""))


def find_sftp_server() -> str | None:
    """Path of OpenSSH's stand-alone ``sftp-server``, needed for request counting, or None."""
    candidates = [
        DEFAULT_SFTP_SERVER,
        "/usr/libexec/openssh/sftp-server",
        "/usr/libexec/sftp-server",
        "/usr/lib/ssh/sftp-server",
    ]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_port() -> int:
    """A port the kernel just had free on 127.0.0.1; sshd may still lose a race for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _write_private(path: Path, data: bytes) -> None:
    """Write a key file readable by its owner only (sshd rejects group/world-readable keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _new_ed25519(path: Path, comment: str) -> str:
    """Create an OpenSSH-format ed25519 key at ``path``; return its ``ssh-ed25519 AAAA…`` line."""
    key = Ed25519PrivateKey.generate()
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    line = f"{public.decode('ascii')} {comment}"
    path.with_name(path.name + ".pub").write_text(line + "\n", encoding="ascii")
    return line


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, …), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields if len(fields) > 19 else None


def _descendants(root_pid: int) -> list[tuple[int, str]]:
    """(PID, start time) of every process below ``root_pid`` (Linux /proc; else empty)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    parents: dict[int, list[tuple[int, str]]] = collections.defaultdict(list)
    for entry in proc.iterdir():
        fields = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[1].isdigit():
            parents[int(fields[1])].append((int(entry.name), fields[19]))
    found: list[tuple[int, str]] = []
    pending = [root_pid]
    while pending:
        children = parents.get(pending.pop(), [])
        found.extend(children)
        pending.extend(pid for pid, _ in children)
    return found


class SshServer:
    """A private ``sshd`` on 127.0.0.1 with throw-away keys, stopped and deleted on exit.

    ``count_requests=True`` serves SFTP through ``sftp-server -l DEBUG3`` behind a ``/bin/sh``
    wrapper so :meth:`sftp_request_count` can report what clients asked for; the default,
    ``internal-sftp``, spawns no shell and no process per channel and is the faster choice when
    nothing is counted. ``max_sessions`` sets sshd's ``MaxSessions`` (channels per connection).
    """

    def __init__(
        self,
        *,
        count_requests: bool = False,
        max_sessions: int | None = None,
        log_level: str = "INFO",
        start_timeout: float = 10.0,
        sshd_path: str | None = None,
        sftp_server_path: str | None = None,
        extra_config: Sequence[str] = (),
        keep_files: bool = False,
    ) -> None:
        self.count_requests = count_requests
        self.max_sessions = max_sessions
        self.log_level = log_level.upper()
        self.start_timeout = start_timeout
        self.extra_config = tuple(extra_config)
        self.keep_files = keep_files
        self._sshd_path = sshd_path
        self._sftp_server_path = sftp_server_path
        self.host = HOST
        self.port = 0
        self.username = pwd.getpwuid(os.getuid()).pw_name
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._host_key_line = ""
        self._client_pkey: paramiko.PKey | None = None
        self._count_offset = 0

    # -- paths ---------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The temporary directory holding keys, config and logs (exists while started)."""
        if self._dir is None:
            raise SshServerError("the server is not started; use it as a context manager")
        return self._dir

    @property
    def client_key_path(self) -> Path:
        """Private key (OpenSSH format, no passphrase) that the server accepts for ``username``."""
        return self.directory / "client_ed25519"

    @property
    def host_key_path(self) -> Path:
        return self.directory / "ssh_host_ed25519_key"

    @property
    def known_hosts_path(self) -> Path:
        """A known_hosts file trusting exactly this server's host key at ``[127.0.0.1]:PORT``."""
        return self.directory / "known_hosts"

    @property
    def config_path(self) -> Path:
        return self.directory / "sshd_config"

    @property
    def log_path(self) -> Path:
        """sshd's own log (``-E``)."""
        return self.directory / "sshd.log"

    @property
    def sftp_log_path(self) -> Path:
        """Where the counting wrapper appends sftp-server's DEBUG3 log."""
        return self.directory / "sftp-server.log"

    @property
    def host_public_key(self) -> str:
        """The host key as ``ssh-ed25519 AAAA…`` (what a known_hosts entry holds)."""
        return " ".join(self._host_key_line.split()[:2])

    @property
    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {self.host_public_key}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> SshServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create keys and config, start sshd and return once it accepts connections."""
        if self._proc is not None:
            raise SshServerError("the server is already running")
        sshd = self._sshd_path or find_sshd()
        if sshd is None or not os.access(sshd, os.X_OK):
            raise SshServerError(f"OpenSSH sshd was not found; {_INSTALL_HINT}")
        sftp_server = ""
        if self.count_requests:
            sftp_server = self._sftp_server_path or find_sftp_server() or ""
            if not os.access(sftp_server, os.X_OK):
                raise SshServerError(
                    "request counting needs OpenSSH's stand-alone sftp-server "
                    f"(looked for {DEFAULT_SFTP_SERVER}); {_INSTALL_HINT}"
                )
        if os.geteuid() == 0:
            # sshd running as root insists on its privilege-separation directory.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

        self._client_pkey = None
        self._count_offset = 0
        self._dir = Path(tempfile.mkdtemp(prefix="runicorn-sshd-"))
        try:
            self._prepare_files(sftp_server)
            self._launch(sshd)
        except BaseException:
            self.stop()
            raise

    def _prepare_files(self, sftp_server: str) -> None:
        directory = self.directory
        self._host_key_line = _new_ed25519(self.host_key_path, "runicorn-test-host")
        client_line = _new_ed25519(self.client_key_path, "runicorn-test-client")
        (directory / "authorized_keys").write_text(client_line + "\n", encoding="ascii")
        # An empty home for sessions: the user's real shell start-up files (pyenv in root's
        # .bashrc here) would otherwise run, and cost CPU, for every subsystem channel.
        (directory / "home").mkdir(mode=0o700)
        self.sftp_log_path.touch()
        if sftp_server:
            wrapper = directory / "sftp-wrapper.sh"
            log = shlex.quote(str(self.sftp_log_path))
            wrapper.write_text(
                "# harness.sshd: sftp-server logging every request for counting.\n"
                f'echo "{_SESSION_MARK} start $$" >>{log}\n'
                f"{shlex.quote(sftp_server)} -l DEBUG3 -e 2>>{log}\n"
                "status=$?\n"
                f'echo "{_SESSION_MARK} end $$ $status" >>{log}\n'
                "exit $status\n",
                encoding="ascii",
            )

    def _config_text(self) -> str:
        directory = self.directory
        if self.count_requests:
            subsystem = f"/bin/sh {directory / 'sftp-wrapper.sh'}"
        else:
            subsystem = "internal-sftp"
        lines = [
            f"ListenAddress {self.host}",
            f"Port {self.port}",
            f"HostKey {self.host_key_path}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {self.username}",
            "PermitUserEnvironment no",
            f"SetEnv HOME={directory / 'home'}",
            "PrintMotd no",
            "X11Forwarding no",
            # Benchmarks open many connections at once; the default 10:30:100 drops some.
            "MaxStartups 100",
            f"LogLevel {self.log_level}",
            f"Subsystem sftp {subsystem}",
        ]
        if self.max_sessions is not None:
            lines.append(f"MaxSessions {self.max_sessions}")
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"

    def _launch(self, sshd: str) -> None:
        last_error = ""
        for _attempt in range(_START_ATTEMPTS):
            self.port = _free_port()
            self.config_path.write_text(self._config_text(), encoding="ascii")
            self.known_hosts_path.write_text(self.known_hosts_line + "\n", encoding="ascii")
            started = time.monotonic()
            with open(self.log_path, "wb") as log:  # one attempt's log, for its error
                self._proc = subprocess.Popen(
                    [sshd, "-D", "-e", "-f", str(self.config_path), "-E", str(self.log_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env={"PATH": _SBIN_PATH, "LANG": "C"},
                    # Own session: a Ctrl-C aimed at pytest must not kill sshd before teardown.
                    start_new_session=True,
                )
            outcome = self._wait_ready()
            if outcome == "ready":
                logger.debug(
                    "sshd %d listening on %s:%d after %.3f s",
                    self._proc.pid,
                    self.host,
                    self.port,
                    time.monotonic() - started,
                )
                return
            self._stop_process()
            last_error = outcome
            if "Address already in use" not in outcome:
                break
            logger.debug("port %d was taken before sshd bound it; retrying", self.port)
        raise SshServerError(
            f"sshd did not start: {last_error}\n--- sshd log ---\n{self.sshd_log()}"
        )

    def _wait_ready(self) -> str:
        """Poll until sshd answers with its banner; return "ready" or why it is not."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        listen_line = f"Server listening on {self.host} port {self.port}"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                log = self.sshd_log()
                if "Address already in use" in log:
                    return "Address already in use"
                return f"sshd exited with status {code}"
            if self.log_level in _LISTEN_LOGGED_LEVELS and listen_line not in self.sshd_log():
                time.sleep(0.005)
                continue
            if self._banner_ok():
                return "ready"
            time.sleep(0.005)
        return f"not accepting connections on {self.host}:{self.port} after {self.start_timeout} s"

    def _banner_ok(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as probe:
                return probe.recv(64).startswith(b"SSH-2.0-")
        except OSError:
            return False

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        children = _descendants(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        # Connection handlers outlive the listener while a client stays connected. The start
        # time guards against signalling an unrelated process that reused a PID.
        for pid, start_time in children:
            fields = _proc_stat(pid)
            if fields is not None and fields[19] == start_time:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)

    def stop(self) -> None:
        """Stop sshd (terminate, then kill) and remove the temporary directory."""
        self._stop_process()
        directory, self._dir = self._dir, None
        if directory is not None:
            if self.keep_files:
                logger.info("keeping sshd files in %s", directory)
            else:
                shutil.rmtree(directory, ignore_errors=True)

    def sshd_log(self) -> str:
        """sshd's log so far, for failure messages."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    # -- clients -------------------------------------------------------------------------------

    def client_key(self) -> paramiko.PKey:
        """The throw-away client key as a paramiko key (loaded once)."""
        if self._client_pkey is None:
            self._client_pkey = paramiko.Ed25519Key.from_private_key_file(str(self.client_key_path))
        return self._client_pkey

    def host_key(self) -> paramiko.PKey:
        """The server's ed25519 host key as a paramiko key, loaded by its own class:
        ``PKey.from_path`` on paramiko 3.x touches cryptography's deprecated DSA names,
        a warning (an error under the suite's ``filterwarnings``) on cryptography 51."""
        return paramiko.Ed25519Key.from_private_key_file(str(self.host_key_path))

    def connect(self, *, timeout: float = 10.0) -> paramiko.SSHClient:
        """A connected client that trusts this server through ``known_hosts_path`` only.

        ``RejectPolicy`` and no agent or default keys: the test sees exactly what a careful
        client sees, and nothing from the developer's own ~/.ssh leaks in.
        """
        if self._proc is None:
            raise SshServerError("the server is not running")
        client = paramiko.SSHClient()
        client.load_host_keys(str(self.known_hosts_path))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.username,
                pkey=self.client_key(),
                allow_agent=False,
                look_for_keys=False,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
            )
        except BaseException:
            client.close()
            raise
        return client

    def runicorn_connect(self, **options: object) -> paramiko.SSHClient:
        """A client opened by runicorn's own :func:`runicorn.transport.ssh.connect`, seeing
        only this server's key and known_hosts: no ssh_config, agent or system known_hosts.

        ``options`` go to ``connect`` and may override ``port``, ``identity_files`` and
        ``known_hosts`` (a test of host-key trust names its own file).
        """
        from runicorn.transport.ssh import connect

        settings: dict[str, object] = {
            "port": self.port,
            "identity_files": [self.client_key_path],
            "known_hosts": self.known_hosts_path,
            "config_path": None,
            "system_known_hosts": None,
            "allow_agent": False,
            "timeout": 10.0,
        }
        settings.update(options)
        return connect(f"{self.username}@{self.host}", **settings)  # type: ignore[arg-type]

    def ssh_config_block(
        self,
        alias: str,
        *,
        via: tuple[str, int] | None = None,
        known_hosts: str | os.PathLike[str] | None = None,
    ) -> str:
        """The ``Host alias`` block of an ssh_config that reaches this server: directly, or
        at ``via`` (``(host, port)`` of a proxy in front of it, such as
        :class:`harness.wan_proxy.WanProxy`) trusting its key in ``known_hosts`` (which must
        hold :meth:`known_hosts_line_at` ``via``; default: this server's own file)."""
        host, port = via if via is not None else (self.host, self.port)
        return "\n".join(
            [
                f"Host {alias}",
                f"    HostName {host}",
                f"    Port {port}",
                f"    User {self.username}",
                f"    IdentityFile {self.client_key_path}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {known_hosts or self.known_hosts_path}",
                "    StrictHostKeyChecking yes",
                "",
            ]
        )

    def known_hosts_line_at(self, via: tuple[str, int]) -> str:
        """A known_hosts line trusting this server's key at another address (a proxy's)."""
        host, port = via
        return f"[{host}]:{port} {self.host_public_key}"

    def write_ssh_config(
        self, path: str | os.PathLike[str], alias: str, *, via: tuple[str, int] | None = None
    ) -> Path:
        """Write an ssh_config with a ``Host alias`` block reaching this server (through the
        proxy at ``via``, when given, with a known_hosts beside it: ``<path>.known_hosts``);
        return the path.

        For CLI tests: ``runicorn sync alias:/root cache`` resolves HostName, Port, User, key and
        known_hosts from it exactly as from a user's ~/.ssh/config.
        """
        target = Path(path)
        known_hosts = None
        if via is not None:
            known_hosts = target.with_name(target.name + ".known_hosts")
            known_hosts.write_text(self.known_hosts_line_at(via) + "\n", encoding="ascii")
        target.write_text(
            self.ssh_config_block(alias, via=via, known_hosts=known_hosts), encoding="utf-8"
        )
        return target

    # -- request counting ----------------------------------------------------------------------

    def _require_counting(self) -> None:
        if not self.count_requests:
            raise SshServerError(
                "request counting is off; start the server with SshServer(count_requests=True)"
            )

    def _log_since_reset(self) -> list[str]:
        """Complete lines appended to the sftp log since the last reset."""
        return self._log_lines(self._count_offset)

    def _log_lines(self, offset: int) -> list[str]:
        """Complete lines of the sftp log from byte ``offset`` on."""
        with open(self.sftp_log_path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
        # A line still being written has no newline yet; it is counted once complete.
        complete = data[: data.rfind(b"\n") + 1]
        return complete.decode("utf-8", errors="replace").splitlines()

    def reset_request_counts(
        self, *, after_sessions_end: bool = False, timeout: float = 5.0
    ) -> None:
        """Start counting afresh: later counts include only requests logged from now on.

        A client that has returned may still have requests in flight to its sftp-server (an
        asynchronous CLOSE, a prefetch it abandoned): the server logs them after the client is
        gone, under load well after. ``after_sessions_end=True`` first waits until every SFTP
        session this server ever started has ended, so none of its requests land in the new
        count; use it when the previous operation's clients are all closed.
        """
        self._require_counting()
        if after_sessions_end:
            self._wait_sessions_ended(0, timeout)
        self._count_offset = self.sftp_log_path.stat().st_size

    def open_sftp_sessions(self) -> set[int]:
        """PIDs of sftp-server sessions started since the reset that have not exited yet."""
        self._require_counting()
        return self._open_sessions(self._log_since_reset())

    @staticmethod
    def _open_sessions(lines: Iterable[str]) -> set[int]:
        running: set[int] = set()
        for line in lines:
            match = _SESSION_RE.match(line)
            if match is None:
                continue
            if match.group(1) == "start":
                running.add(int(match.group(2)))
            else:
                running.discard(int(match.group(2)))
        return running

    def wait_sftp_sessions_closed(self, timeout: float = 5.0) -> None:
        """Wait until every SFTP session started since the reset has ended on the server."""
        self._require_counting()
        self._wait_sessions_ended(self._count_offset, timeout)

    def _wait_sessions_ended(self, offset: int, timeout: float) -> None:
        """Wait until every session whose start is logged at or after ``offset`` has ended.

        A wrapper killed by a signal never logs its end; its vanished process counts as ended.
        """
        deadline = time.monotonic() + timeout
        while True:
            running = {
                pid
                for pid in self._open_sessions(self._log_lines(offset))
                if not _HAVE_PROC or Path(f"/proc/{pid}").exists()
            }
            if not running:
                return
            if time.monotonic() >= deadline:
                raise SshServerError(
                    f"sftp-server processes {sorted(running)} still running after {timeout} s; "
                    "close the SFTP clients (and their channels) before waiting for their "
                    "sessions to end"
                )
            time.sleep(0.005)

    def sftp_request_count(
        self, *, wait_for_close: bool = False, timeout: float = 5.0
    ) -> SftpRequestCounts:
        """SFTP requests the server received since the last reset, total and by type.

        sftp-server logs each request when it parses it, before it replies, and its log is
        unbuffered: every request whose reply the client has seen is already counted. A client
        that stops with requests still in flight (an abandoned prefetch, an async close) should
        close its SFTP channels and count with ``wait_for_close=True``, which first waits for
        every sftp-server started since the reset to exit.
        """
        self._require_counting()
        if wait_for_close:
            self.wait_sftp_sessions_closed(timeout)
        lines = self._log_since_reset()
        by_type: collections.Counter[str] = collections.Counter()
        sessions = 0
        for line in lines:
            match = _REQUEST_RE.search(line)
            if match is not None:
                by_type[match.group(2)] += 1
            elif line.startswith(f"{_SESSION_MARK} start "):
                sessions += 1
        return SftpRequestCounts(
            total=sum(by_type.values()), by_type=dict(by_type), sessions=sessions
        )
