"""Every paramiko internal that runicorn.transport.openssh_shortcuts hooks still exists, with the
signature we call or override: a paramiko release that changes one fails here, loudly and by
name, instead of breaking every sync in the field.

No server is needed: the classes are inspected and instantiated on an unconnected socket. The
module sits with the real-sshd tests all the same, so that CI's pass over both ends of the
tested paramiko range (which runs tests/sshd) checks the hooks on each.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from paramiko.common import MSG_SERVICE_ACCEPT

from runicorn.transport import openssh_shortcuts
from runicorn.transport.openssh_shortcuts import (
    PRIVATE_API,
    PipelinedAuthHandler,
    Prefetched,
    PrefetchingSFTPClient,
    PrivateHook,
)


def _owner(hook: PrivateHook) -> type:
    module_name, _, class_name = hook.owner.rpartition(".")
    assert module_name == "paramiko", hook.owner
    owner = getattr(paramiko, class_name, None)
    if owner is None:
        pytest.fail(_broken(hook, f"paramiko no longer exports {class_name}"), pytrace=False)
    return owner


def _broken(hook: PrivateHook, problem: str) -> str:
    return (
        f"paramiko {paramiko.__version__}: {hook.owner}.{hook.name}: {problem}. "
        f"runicorn relies on it ({hook.use}). Update runicorn/transport/openssh_shortcuts.py "
        "and the tested paramiko range in pyproject.toml; until then users can set "
        "RUNICORN_OPENSSH_SHORTCUTS=0."
    )


@pytest.fixture
def transport() -> Iterator[paramiko.Transport]:
    """A client Transport on one end of a socket pair: built, never started."""
    near, far = socket.socketpair()
    try:
        yield paramiko.Transport(near)
    finally:
        near.close()
        far.close()


def _instance(owner: type, transport: paramiko.Transport) -> object:
    if owner is paramiko.Transport:
        return transport
    if owner is paramiko.AuthHandler:
        return paramiko.AuthHandler(transport)
    if owner is paramiko.Channel:
        return paramiko.Channel(0)
    raise AssertionError(f"no way to build a {owner.__name__} for the check")


def _hook_id(hook: PrivateHook) -> str:
    return f"{hook.owner}.{hook.name}"


@pytest.mark.parametrize("hook", [h for h in PRIVATE_API if h.parameters is not None], ids=_hook_id)
def test_each_hooked_method_exists_with_the_signature_we_rely_on(hook: PrivateHook) -> None:
    owner = _owner(hook)
    method = inspect.getattr_static(owner, hook.name, None)
    if method is None or not callable(method):
        pytest.fail(_broken(hook, "the method is gone"), pytrace=False)
    parameters = list(inspect.signature(method).parameters)
    if parameters[:1] == ["self"]:
        parameters = parameters[1:]
    if tuple(parameters) != hook.parameters:
        pytest.fail(
            _broken(
                hook,
                f"its parameters are ({', '.join(parameters)}), "
                f"we call it with ({', '.join(hook.parameters or ())})",
            ),
            pytrace=False,
        )


@pytest.mark.parametrize("hook", [h for h in PRIVATE_API if h.parameters is None], ids=_hook_id)
def test_each_hooked_instance_attribute_is_set_by_paramiko(
    hook: PrivateHook, transport: paramiko.Transport
) -> None:
    instance = _instance(_owner(hook), transport)
    if not hasattr(instance, hook.name):
        pytest.fail(_broken(hook, "a new instance no longer has this attribute"), pytrace=False)


def test_the_pipelined_handler_receives_the_service_accept(
    transport: paramiko.Transport,
) -> None:
    """paramiko dispatches SERVICE_ACCEPT through the handler instance, so our override of
    ``_parse_service_accept`` is the one that runs (it drops the late answer)."""
    handler = PipelinedAuthHandler(transport)
    dispatched = handler._client_handler_table.get(MSG_SERVICE_ACCEPT)
    if getattr(dispatched, "__func__", None) is not PipelinedAuthHandler._parse_service_accept:
        hook = next(h for h in PRIVATE_API if h.name == "_client_handler_table")
        pytest.fail(
            _broken(hook, f"SERVICE_ACCEPT goes to {dispatched!r}, not our override"),
            pytrace=False,
        )


def test_sftp_client_init_takes_the_server_version_from_send_version() -> None:
    """PrefetchingSFTPClient's INIT happened already: paramiko's ``__init__`` must ask
    ``_send_version`` for the version and otherwise leave the channel alone."""

    class Untouchable:
        """A channel that may be named in a log line, never read or written."""

        def get_name(self) -> str:
            return "chan 0"

        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"paramiko's SFTPClient.__init__ used the channel ({name})")

    prefetched = Prefetched("/lab", 10, {})
    client = PrefetchingSFTPClient(Untouchable(), 3, "/lab", prefetched)  # type: ignore[arg-type]
    assert client.root == "/lab" and client.prefetched is prefetched


def test_the_transport_class_is_paramikos_own_when_the_environment_turns_shortcuts_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(openssh_shortcuts.ENV_VAR, "0")
    assert openssh_shortcuts.transport_class() is paramiko.Transport
    monkeypatch.setenv(openssh_shortcuts.ENV_VAR, "1")
    assert openssh_shortcuts.transport_class() is openssh_shortcuts.ClientTransport


@pytest.mark.parametrize(
    ("value", "banner", "expected"),
    [
        (None, "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3", True),
        ("", "SSH-2.0-OpenSSH_9.2p1", True),
        ("1", "SSH-2.0-OpenSSH_9.2p1", True),
        ("0", "SSH-2.0-OpenSSH_9.2p1", False),
        ("off", "SSH-2.0-OpenSSH_9.2p1", False),
        (None, "SSH-2.0-dropbear_2022.83", False),
        ("1", "SSH-2.0-dropbear_2022.83", False),
    ],
)
def test_the_switch_is_on_only_for_openssh_and_not_turned_off(
    value: str | None, banner: str, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FakeTransport:
        remote_version = banner

    if value is None:
        monkeypatch.delenv(openssh_shortcuts.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(openssh_shortcuts.ENV_VAR, value)
    assert openssh_shortcuts.enabled(FakeTransport()) is expected  # type: ignore[arg-type]


def test_the_tested_ends_of_the_paramiko_range_lie_inside_the_pin() -> None:
    """CI installs ``[tool.runicorn.paramiko-tested]``'s ends: they must satisfy the pin."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    pins = [Requirement(d) for d in data["project"]["dependencies"]]
    paramiko_pin = next(r for r in pins if r.name == "paramiko")
    tested = data["tool"]["runicorn"]["paramiko-tested"]
    assert paramiko_pin.specifier.contains(tested["lowest"]), (paramiko_pin, tested)
    assert paramiko_pin.specifier.contains(tested["highest"]), (paramiko_pin, tested)
