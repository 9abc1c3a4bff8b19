"""The hot paths -- scanning, diffing, tail hashing -- in two interchangeable backends.

The modules ``scan``, ``diff`` and ``tailhash`` are the pure-Python specification; their
compiled twins are ``_native_scan``, ``_native_diff`` and ``_native_tailhash``.
:mod:`runicorn.core.backend` chooses between them.
"""

from runicorn.core.backend import Backend, active_backend, load_backend, native_available

__all__ = ["Backend", "active_backend", "load_backend", "native_available"]
