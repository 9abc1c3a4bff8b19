# cython: language_level=3, binding=True, annotation_typing=False
"""Compiled twin of :mod:`runicorn.core.diff`: the sorted merge of manifest entries in C.

Why this module exists: a client compares every entry of the manifest with its cache on
every sync, and a large lab lists a million files. The pure-Python merge spends almost all
of its time in interpreter overhead (a function call per entry to check the order, another
to classify it, tuple unpacking); here the same loop runs over the list and tuple storage
directly and compares ``str``, ``int`` and ``float`` values with C operations.

Why it is a twin and not a replacement: :mod:`runicorn.core.diff` is the specification.
This module imports its ``DiffResult`` and rule documentation, copies the docstrings of the
public functions at import (a test checks they match), and keeps exactly the same loop
shape, so that errors -- which side is reported as unsorted, and at which index -- come out
identical. Inputs the fast path does not recognise (a sequence other than ``list`` or
``tuple``, an entry that is not a tuple of the expected length) are handed to the
specification itself, so even their exceptions are the pure module's.
"""

cimport cython
from cpython.object cimport PyObject_RichCompareBool, Py_EQ, Py_GT
from cpython.float cimport PyFloat_AS_DOUBLE

from runicorn.core import diff as _pure
from runicorn.core.diff import DiffResult, LocalEntry, RemoteEntry

__all__ = ["DiffResult", "LocalEntry", "RemoteEntry", "classify", "diff_entries"]

cdef extern from "Python.h":
    int PyUnicode_Compare(object left, object right) except? -1

cdef object _pure_classify = _pure.classify


cdef inline bint _lt(object a, object b) except -1:
    """``a < b`` with Python semantics; a C string comparison for two exact ``str``."""
    if type(a) is str and type(b) is str:
        return PyUnicode_Compare(a, b) < 0
    return bool(a < b)


cdef inline bint _eq(object a, object b) except -1:
    """``a == b`` with Python semantics (no identity shortcut, so NaN stays unequal)."""
    if type(a) is float and type(b) is float:
        return PyFloat_AS_DOUBLE(a) == PyFloat_AS_DOUBLE(b)
    if (type(a) is int and type(b) is int) or (type(a) is str and type(b) is str):
        # equality of ints and strs is reflexive: the identity shortcut is exact
        return PyObject_RichCompareBool(a, b, Py_EQ)
    return bool(a == b)


cdef inline bint _gt(object a, object b) except -1:
    if type(a) is int and type(b) is int:
        return PyObject_RichCompareBool(a, b, Py_GT)
    return bool(a > b)


cdef inline bint _truth(object value) except -1:
    if value is True:
        return True
    if value is False or value is None:
        return False
    return bool(value)


cdef int _classify(object remote, object local) except -1:
    cdef tuple r
    cdef tuple lo
    if type(remote) is not tuple or len(<tuple>remote) != 5 or \
            type(local) is not tuple or len(<tuple>local) != 4:
        return _pure_classify(remote, local)
    r = <tuple>remote
    lo = <tuple>local
    r_size = r[1]
    l_size = lo[1]
    if _eq(r_size, l_size):
        if _eq(r[2], lo[2]):
            return 0
        r_hash = r[4]
        if _truth(r[3]) and r_hash is not None and _eq(r_hash, lo[3]):
            return 0
        return 2
    if _truth(r[3]) and _gt(r_size, l_size):
        return 1
    return 2


def classify(remote: RemoteEntry, local: LocalEntry) -> int:
    return _classify(remote, local)


cdef inline object _path_of(object entry):
    if type(entry) is tuple and len(<tuple>entry) > 0:
        return (<tuple>entry)[0]
    return entry[0]


cdef inline int _check_sorted(object previous, object path, str side, Py_ssize_t index) except -1:
    if previous is not None and not _lt(previous, path):
        raise ValueError(
            f"{side} entries must be sorted by path without duplicates: "
            f"entry {index} {path!r} follows {previous!r}"
        )
    return 0


@cython.boundscheck(True)
def diff_entries(remote: Sequence[RemoteEntry], local: Sequence[LocalEntry]) -> DiffResult:
    if (type(remote) is not list and type(remote) is not tuple) or \
            (type(local) is not list and type(local) is not tuple):
        return _pure.diff_entries(remote, local)
    cdef list r_list = remote if type(remote) is list else list(remote)
    cdef list l_list = local if type(local) is list else list(local)
    cdef list new = []
    cdef list grown = []
    cdef list replaced = []
    cdef list vanished = []
    cdef Py_ssize_t unchanged = 0
    cdef Py_ssize_t n_remote = len(r_list)
    cdef Py_ssize_t n_local = len(l_list)
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t j = 0
    cdef int kind
    cdef object r_path = None
    cdef object l_path = None
    cdef object last_remote = None
    cdef object last_local = None
    cdef object r_entry
    cdef object l_entry
    while i < n_remote or j < n_local:
        if i < n_remote:
            r_entry = r_list[i]
            r_path = _path_of(r_entry)
            _check_sorted(last_remote, r_path, "remote", i)
        if j < n_local:
            l_entry = l_list[j]
            l_path = _path_of(l_entry)
            _check_sorted(last_local, l_path, "local", j)
        if j >= n_local or (i < n_remote and _lt(r_path, l_path)):
            new.append(i)
            last_remote = r_path
            i += 1
        elif i >= n_remote or _lt(l_path, r_path):
            vanished.append(j)
            last_local = l_path
            j += 1
        else:
            kind = _classify(r_entry, l_entry)
            if kind == 0:
                unchanged += 1
            elif kind == 1:
                grown.append(i)
            else:
                replaced.append(i)
            last_remote = r_path
            last_local = l_path
            i += 1
            j += 1
    return DiffResult(new, grown, replaced, unchanged, vanished)


classify.__doc__ = _pure.classify.__doc__
diff_entries.__doc__ = _pure.diff_entries.__doc__
