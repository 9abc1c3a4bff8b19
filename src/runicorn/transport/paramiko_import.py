"""Import paramiko without invoke, which it loads only for ``Match exec`` in an ssh_config.

paramiko's config module imports invoke when it is installed, and invoke brings asyncio,
unittest.mock and more: tens of milliseconds of a command's start, on every sync, for a
feature few ssh_configs use. :func:`import_paramiko` keeps invoke out while paramiko is
imported (for a process that imports it first: the ``runicorn`` command); :func:`allow_match_exec`
brings it in when an ssh_config does ask for ``Match exec``, before that config is looked up.
A paramiko that imports invoke unconditionally is imported the ordinary way; a process that
imported paramiko otherwise is left as it is.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["allow_match_exec", "import_paramiko"]

_HIDDEN = ImportError("invoke was not imported (runicorn.transport.paramiko_import)")


def import_paramiko() -> None:
    """Import paramiko, with invoke kept out of it unless something imported invoke already."""
    if "paramiko" in sys.modules or "invoke" in sys.modules:
        return
    sys.modules["invoke"] = None  # type: ignore[assignment]  # `import invoke` raises
    try:
        importlib.import_module("paramiko")
    except ImportError:
        # A paramiko that needs invoke outright: only slower, never broken.
        del sys.modules["invoke"]
        importlib.import_module("paramiko")
        return
    finally:
        if sys.modules.get("invoke", 0) is None:
            del sys.modules["invoke"]
    config = sys.modules.get("paramiko.config")
    if config is not None and getattr(config, "invoke", 0) is None:
        config.invoke_import_error = _HIDDEN  # type: ignore[attr-defined]


def allow_match_exec() -> None:
    """Give paramiko's config module invoke, if :func:`import_paramiko` kept it out and it is
    installed (without it, ``Match exec`` raises paramiko's own ImportError, as always)."""
    config = sys.modules.get("paramiko.config")
    if config is None or getattr(config, "invoke_import_error", None) is not _HIDDEN:
        return
    try:
        invoke = importlib.import_module("invoke")
    except ImportError as error:
        config.invoke_import_error = error  # type: ignore[attr-defined]
        return
    config.invoke = invoke  # type: ignore[attr-defined]
    config.invoke_import_error = None  # type: ignore[attr-defined]
