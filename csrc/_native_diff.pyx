# cython: language_level=3, binding=True, annotation_typing=False, boundscheck=True, wraparound=True
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

from cpython.ref cimport PyObject
from libc.string cimport memcmp

cdef extern from *:
    """
    /* The merge is bound by memory latency: each entry is a chain of objects (list slot,
       tuple, path, size, mtime) scattered over the heap. Prefetching a few entries ahead
       overlaps those cache misses. */
    #if defined(__GNUC__) || defined(__clang__)
    #define RUNICORN_PREFETCH(p) __builtin_prefetch((const void *)(p))
    #else
    #define RUNICORN_PREFETCH(p) ((void)(p))
    #endif
    static inline void runicorn_prefetch_entry(PyObject *list, Py_ssize_t index, Py_ssize_t n) {
        PyObject *entry;
        Py_ssize_t k, size;
        if (index + 16 < n)
            RUNICORN_PREFETCH(PyList_GET_ITEM(list, index + 16));
        if (index + 8 < n) {
            entry = PyList_GET_ITEM(list, index + 8);
            if (PyTuple_CheckExact(entry)) {
                size = PyTuple_GET_SIZE(entry);
                for (k = 0; k < size && k < 3; k++) {
                    RUNICORN_PREFETCH(PyTuple_GET_ITEM(entry, k));
                }
                if (size > 0)
                    RUNICORN_PREFETCH((char *)PyTuple_GET_ITEM(entry, 0) + 64);
            }
        }
    }
    """
    void runicorn_prefetch_entry(PyObject *list, Py_ssize_t index, Py_ssize_t n) noexcept

cdef extern from "Python.h":
    int PyUnicode_Compare(object left, object right) except? -1
    Py_ssize_t PyUnicode_GET_LENGTH(PyObject *o)
    int PyUnicode_KIND(PyObject *o)
    void *PyUnicode_DATA(PyObject *o)
    int PyUnicode_1BYTE_KIND
    # borrowed-reference access for the fast loop, where no Python code can run
    PyObject *PyList_GET_ITEM(PyObject *op, Py_ssize_t i)
    PyObject *PyTuple_GET_ITEM(PyObject *op, Py_ssize_t i)
    Py_ssize_t PyTuple_GET_SIZE(PyObject *op)
    bint PyTuple_CheckExact(PyObject *op)
    bint PyUnicode_CheckExact(PyObject *op)
    bint PyLong_CheckExact(PyObject *op)
    bint PyFloat_CheckExact(PyObject *op)
    int _rich_compare_bool "PyObject_RichCompareBool"(PyObject *a, PyObject *b, int op)
    double _float_value "PyFloat_AS_DOUBLE"(PyObject *op)
    PyObject *_Py_True "Py_True"
    PyObject *_Py_False "Py_False"
    PyObject *_Py_None "Py_None"

cdef object _pure_classify = _pure.classify


cdef inline int _compare_str(object a, object b) noexcept:
    return _compare_str_p(<PyObject *>a, <PyObject *>b)


cdef inline int _compare_str_p(PyObject *a, PyObject *b) noexcept:
    """Three-way code-point comparison of two exact ``str`` (never fails): ``memcmp`` when
    both are stored one byte per character (ASCII and Latin-1 paths, the usual case)."""
    cdef Py_ssize_t len_a, len_b
    cdef int order
    if PyUnicode_KIND(a) == PyUnicode_1BYTE_KIND and PyUnicode_KIND(b) == PyUnicode_1BYTE_KIND:
        len_a = PyUnicode_GET_LENGTH(a)
        len_b = PyUnicode_GET_LENGTH(b)
        order = memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b),
                       <size_t>(len_a if len_a < len_b else len_b))
        if order:
            return order
        return (len_a > len_b) - (len_a < len_b)
    return PyUnicode_Compare(<object>a, <object>b)


cdef inline bint _lt(object a, object b) except -1:
    """``a < b`` with Python semantics; a C string comparison for two exact ``str``."""
    if type(a) is str and type(b) is str:
        return _compare_str(a, b) < 0
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


cdef inline int _classify_plain(PyObject *r, PyObject *lo) noexcept:
    """``classify`` for entries of the plain types a manifest decodes to (``int`` sizes,
    ``float`` or ``int`` mtimes, ``bool`` flag, ``str`` or ``None`` hashes); -1 for anything
    else, which the generic path then handles."""
    cdef PyObject *r_size = PyTuple_GET_ITEM(r, 1)
    cdef PyObject *l_size = PyTuple_GET_ITEM(lo, 1)
    cdef PyObject *r_mtime = PyTuple_GET_ITEM(r, 2)
    cdef PyObject *l_mtime = PyTuple_GET_ITEM(lo, 2)
    cdef PyObject *append_only = PyTuple_GET_ITEM(r, 3)
    cdef PyObject *r_hash = PyTuple_GET_ITEM(r, 4)
    cdef PyObject *l_hash = PyTuple_GET_ITEM(lo, 3)
    cdef bint same_mtime
    if not (PyLong_CheckExact(r_size) and PyLong_CheckExact(l_size)):
        return -1
    if append_only != _Py_True and append_only != _Py_False:
        return -1
    if (r_hash != _Py_None and not PyUnicode_CheckExact(r_hash)) or \
            (l_hash != _Py_None and not PyUnicode_CheckExact(l_hash)):
        return -1
    if _rich_compare_bool(r_size, l_size, Py_EQ):
        if PyFloat_CheckExact(r_mtime) and PyFloat_CheckExact(l_mtime):
            same_mtime = _float_value(r_mtime) == _float_value(l_mtime)
        elif PyLong_CheckExact(r_mtime) and PyLong_CheckExact(l_mtime):
            same_mtime = _rich_compare_bool(r_mtime, l_mtime, Py_EQ)
        else:
            return -1
        if same_mtime:
            return 0
        if append_only == _Py_True and r_hash != _Py_None and l_hash != _Py_None and \
                _compare_str_p(r_hash, l_hash) == 0:
            return 0
        return 2
    if append_only == _Py_True and _rich_compare_bool(r_size, l_size, Py_GT):
        return 1
    return 2


cdef struct Merge:
    Py_ssize_t i
    Py_ssize_t j
    Py_ssize_t unchanged


cdef int _fast_merge(list r_list, list l_list, Merge *m, list new, list grown,
                     list replaced, list vanished) except -1:
    """The merge over plain entries with borrowed references and no Python code run. Stops
    at the first entry it does not vouch for (odd types, wrong order, a mutated list), with
    ``m`` where the generic loop must carry on; that loop then reports any error."""
    cdef Py_ssize_t i = m.i
    cdef Py_ssize_t j = m.j
    cdef Py_ssize_t n_remote = len(r_list)
    cdef Py_ssize_t n_local = len(l_list)
    cdef Py_ssize_t checked_remote = -1
    cdef Py_ssize_t checked_local = -1
    cdef PyObject *r_entry = NULL
    cdef PyObject *l_entry = NULL
    cdef PyObject *r_path = NULL
    cdef PyObject *l_path = NULL
    cdef PyObject *last_remote = NULL
    cdef PyObject *last_local = NULL
    cdef PyObject *rl = <PyObject *>r_list
    cdef PyObject *ll = <PyObject *>l_list
    cdef int order, kind
    cdef Py_ssize_t unchanged = 0
    cdef bint local_pending
    cdef bint last_matched = False  # last_remote and last_local are equal strings
    if i > 0 or j > 0:
        return 0
    try:
        while i < n_remote or j < n_local:
            runicorn_prefetch_entry(rl, i, n_remote)
            runicorn_prefetch_entry(ll, j, n_local)
            if i < n_remote:
                r_entry = PyList_GET_ITEM(rl, i)
                if not PyTuple_CheckExact(r_entry) or PyTuple_GET_SIZE(r_entry) != 5:
                    break
                r_path = PyTuple_GET_ITEM(r_entry, 0)
                if not PyUnicode_CheckExact(r_path):
                    break
                if checked_remote != i:
                    if last_remote != NULL and _compare_str_p(last_remote, r_path) >= 0:
                        break
                    checked_remote = i
            local_pending = False
            if j < n_local:
                l_entry = PyList_GET_ITEM(ll, j)
                if not PyTuple_CheckExact(l_entry) or PyTuple_GET_SIZE(l_entry) != 4:
                    break
                l_path = PyTuple_GET_ITEM(l_entry, 0)
                if not PyUnicode_CheckExact(l_path):
                    break
                if checked_local != j:
                    if last_local == NULL:
                        checked_local = j
                    else:
                        local_pending = True
            if j >= n_local:
                order = -1
            elif i >= n_remote:
                order = 1
            else:
                order = _compare_str_p(r_path, l_path)
            if local_pending:
                # after a match the local check repeats the remote one, which passed
                if not (order == 0 and last_matched and checked_remote == i) and \
                        _compare_str_p(last_local, l_path) >= 0:
                    break
                checked_local = j
            if order < 0:
                new.append(i)
                last_remote = r_path
                last_matched = False
                i += 1
            elif order > 0:
                vanished.append(j)
                last_local = l_path
                last_matched = False
                j += 1
            else:
                kind = _classify_plain(r_entry, l_entry)
                if kind < 0:
                    break
                if kind == 0:
                    unchanged += 1
                elif kind == 1:
                    grown.append(i)
                else:
                    replaced.append(i)
                last_remote = r_path
                last_local = l_path
                last_matched = True
                i += 1
                j += 1
    finally:
        m.i = i
        m.j = j
        m.unchanged = unchanged
    return 0


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
    cdef Py_ssize_t checked_remote = -1  # an index whose order is known to be fine
    cdef Py_ssize_t checked_local = -1
    cdef int order
    cdef Merge merge
    merge.i = merge.j = merge.unchanged = 0
    _fast_merge(r_list, l_list, &merge, new, grown, replaced, vanished)
    i = merge.i
    j = merge.j
    unchanged = merge.unchanged
    if i > 0:
        last_remote = _path_of(r_list[i - 1])
    if j > 0:
        last_local = _path_of(l_list[j - 1])
    while i < n_remote or j < n_local:
        if i < n_remote:
            r_entry = r_list[i]
            r_path = _path_of(r_entry)
            if checked_remote != i:
                _check_sorted(last_remote, r_path, "remote", i)
                if type(r_path) is str and (last_remote is None or type(last_remote) is str):
                    checked_remote = i  # str order cannot change: no need to ask again
        if j < n_local:
            l_entry = l_list[j]
            l_path = _path_of(l_entry)
            if checked_local != j:
                _check_sorted(last_local, l_path, "local", j)
                if type(l_path) is str and (last_local is None or type(last_local) is str):
                    checked_local = j
        if j >= n_local:
            order = -1
        elif i >= n_remote:
            order = 1
        elif type(r_path) is str and type(l_path) is str:
            order = _compare_str(r_path, l_path)
        elif _lt(r_path, l_path):
            order = -1
        elif _lt(l_path, r_path):
            order = 1
        else:
            order = 0
        if order < 0:
            new.append(i)
            last_remote = r_path
            i += 1
        elif order > 0:
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
