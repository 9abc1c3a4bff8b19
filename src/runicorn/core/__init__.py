"""The hot paths -- scanning, diffing, tail hashing, building file entries, copying files
from a local remote -- in two interchangeable backends.

The modules ``scan``, ``diff``, ``tailhash``, ``entries`` and ``copy`` are the pure-Python
specification; their compiled twins are ``_native_scan``, ``_native_diff``,
``_native_tailhash``, ``_native_entries`` and ``_native_copy`` (sources in ``csrc/``).
``memo`` holds what both entry builders consume. :mod:`runicorn.core.backend` chooses
between the two sets.
"""

from runicorn.core.backend import Backend, active_backend, load_backend, native_available

__all__ = ["Backend", "active_backend", "load_backend", "native_available"]
