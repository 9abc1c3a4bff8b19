# cython: language_level=3, binding=True, annotation_typing=False, boundscheck=False, wraparound=False
"""Compiled twin of :mod:`runicorn.core.entries`: file entries built and encoded in C.

Why this module exists: between the scan and the gzip, a generation touches every file of
the lab several times in the interpreter -- classify its name, build its path and entry,
look up its memo, then turn the entry into a dict for orjson. For a 100,000-run lab that is
close to a million iterations of each loop. Here the same loops walk list and tuple
storage directly, classify each distinct file name once, and write the manifest JSON
straight into one buffer, with no dict per entry.

Why it is a twin: :mod:`runicorn.core.entries` is the specification. The loops keep its
shape and call the same Python where a rule lives (``run_prefix``, the file classifier),
so rules are written once; a ``FileEntry`` is filled slot by slot only while the class is
the plain six-field dataclass checked at import. Inputs the fast path does not
recognise -- a run that is not a 4-tuple, a record that is not a 5-tuple of ``str`` and
``int`` -- make the whole call go to the specification, so its results and its errors are
the pure module's. The encoder writes directly only the values whose JSON it can spell
exactly as orjson does (plain ``str`` with nothing to escape, ``int`` of 64 bits, ``bool``,
``None``); floats are formatted by orjson in one batch call, and every other value, and
every entry that is not exactly a ``FileEntry``/``ExperimentEntry``, is encoded by orjson
itself, so the bytes are identical by construction (a property test checks it).
"""

from cpython.ref cimport PyObject
from libc.string cimport memcpy

import orjson

from runicorn.format import layout
from runicorn.core import entries as _pure
from runicorn.core.entries import (
    NS_PER_SECOND,
    Entries,
    FileKind,
    FileStat,
    RunFiles,
    RunScan,
)
from runicorn.format.models import ExperimentEntry, FileEntry

__all__ = ["Entries", "FileKind", "FileStat", "NS_PER_SECOND", "RunFiles", "RunScan",
           "build_file_entries", "encode_experiments"]

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t *size) except NULL
    long long PyLong_AsLongLongAndOverflow(object obj, int *overflow) except? -1
    double PyFloat_AS_DOUBLE(object op)
    PyObject *PyDict_GetItemWithError(object d, object key) except? NULL
    PyObject *_new_bytes "PyBytes_FromStringAndSize"(const char *s, Py_ssize_t n) except NULL
    int _PyBytes_Resize(PyObject **bytes, Py_ssize_t size) except -1
    char *_bytes_data "PyBytes_AS_STRING"(PyObject *bytes)
    void Py_XDECREF(PyObject *obj)


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    ctypedef struct PyTypeObject:
        PyObject *(*tp_alloc)(PyTypeObject *, Py_ssize_t)
    int T_OBJECT_EX
    void Py_INCREF(object o)
    void Py_DECREF(object o)


# -- FileEntry without its Python __init__ --------------------------------------------------
#
# ``FileEntry`` is a slots dataclass whose generated ``__init__`` only stores its six fields.
# Running that bytecode is most of the cost of an entry, so the fast path allocates the
# instance and stores the six slot values itself, at the offsets the slot descriptors
# publish. It does so only when the class is exactly what was checked at import (those six
# object slots, no __post_init__); otherwise the class is called.

_FIELDS = ("path", "size", "mtime", "priority", "is_append_only", "tail_hash")
cdef Py_ssize_t[6] _OFFSETS
cdef bint _DIRECT_ENTRIES = False


cdef bint _find_slot_offsets() except -1:
    import dataclasses
    if tuple(f.name for f in dataclasses.fields(FileEntry)) != _FIELDS \
            or hasattr(FileEntry, "__post_init__") or type(FileEntry) is not type:
        return False
    cdef PyMemberDef *member
    for k, name in enumerate(_FIELDS):
        descriptor = FileEntry.__dict__.get(name)
        if type(descriptor).__name__ != "member_descriptor":
            return False
        member = (<PyMemberDescrObject *><PyObject *>descriptor).d_member
        if member.type != T_OBJECT_EX:
            return False
        _OFFSETS[k] = member.offset
    return True


_DIRECT_ENTRIES = _find_slot_offsets()
_direct_entries = _DIRECT_ENTRIES  # visible to the tests: a changed FileEntry turns it off


cdef inline void _store(PyObject *obj, Py_ssize_t offset, object value):
    Py_INCREF(value)
    (<PyObject **>(<char *>obj + offset))[0] = <PyObject *>value


cdef object _new_entry(str path, object size, object mtime, object priority, object append_only):
    """``FileEntry(path, size, mtime, priority, append_only)``."""
    if not _DIRECT_ENTRIES:
        return FileEntry(path, size, mtime, priority, append_only)
    cdef PyTypeObject *kind = <PyTypeObject *><PyObject *>FileEntry
    cdef PyObject *obj = kind.tp_alloc(kind, 0)
    if obj is NULL:
        raise MemoryError()
    entry = <object>obj  # takes a new reference; the one tp_alloc returned is dropped below
    Py_DECREF(entry)
    _store(obj, _OFFSETS[0], path)
    _store(obj, _OFFSETS[1], size)
    _store(obj, _OFFSETS[2], mtime)
    _store(obj, _OFFSETS[3], priority)
    _store(obj, _OFFSETS[4], append_only)
    _store(obj, _OFFSETS[5], None)
    return entry


cdef object _classify = _pure._classify
cdef object _run_prefix = layout.run_prefix
cdef str _DELETED = layout.DELETED_MARKER
cdef object _BILLION = NS_PER_SECOND
cdef object _dumps = orjson.dumps

# classification of one file name, cached per call: what the loop does with it
cdef enum:
    LISTED = 0
    LEFT_OUT = 1
    DELETED = 2


class _NotFast(Exception):
    """An input the fast path does not take: the specification handles the whole call."""


cdef tuple _kind_of(str path_in_run, tuple watched):
    """(action, kind, watched index) of a file name: computed once per name and call."""
    kind = _classify(path_in_run)
    index = watched.index(path_in_run) if path_in_run in watched else -1
    if kind is None:
        return (DELETED if path_in_run == _DELETED else LEFT_OUT, None, index)
    if type(kind) is not tuple or len(<tuple>kind) != 2:
        raise _NotFast()
    return (LISTED, kind, index)


cdef bint _same_key(object known_key, tuple record) except -1:
    """``known_key == (record[1], record[2], record[3], record[4])``, without the tuple."""
    cdef Py_ssize_t k
    if type(known_key) is not tuple:
        return known_key == (record[1], record[2], record[3], record[4])
    if len(<tuple>known_key) != 4:
        return False
    for k in range(4):
        if not ((<tuple>known_key)[k] == record[k + 1]):
            return False
    return True


cdef object _build(list runs, dict memos, object reuse_before_ns, tuple watched):
    cdef dict kinds = {}
    cdef list built = []
    cdef dict reused = {}
    cdef list stale = []
    cdef dict run_reused
    cdef list run_stale
    cdef list files
    cdef list found
    cdef list records
    cdef tuple record
    cdef tuple run
    cdef tuple cached
    cdef PyObject *hit
    cdef str prefix
    cdef str path_in_run
    cdef str path
    cdef int action
    cdef Py_ssize_t index
    cdef bint deleted
    cdef double value
    cdef double low
    cdef double high
    cdef object oldest
    cdef object newest
    cdef Py_ssize_t n_watched = len(watched)
    for item in runs:
        if type(item) is not tuple or len(<tuple>item) != 4:
            raise _NotFast()
        run = <tuple>item
        if type(run[3]) is not list:
            raise _NotFast()
        records = <list>run[3]
        prefix = _run_prefix(run[0], run[1], run[2])
        files = []
        found = [None] * n_watched
        run_reused = {}
        run_stale = []
        deleted = False
        oldest = newest = None
        low = high = 0.0
        for item in records:
            if type(item) is not tuple or len(<tuple>item) != 5:
                raise _NotFast()
            record = <tuple>item
            if type(record[0]) is not str or type(record[1]) is not int \
                    or type(record[2]) is not int:
                raise _NotFast()
            path_in_run = <str>record[0]
            hit = PyDict_GetItemWithError(kinds, path_in_run)
            if hit is NULL:
                cached = _kind_of(path_in_run, watched)
                kinds[path_in_run] = cached
            else:
                cached = <tuple>hit
            index = cached[2]
            if index >= 0:
                found[index] = record
            action = cached[0]
            if action != LISTED:
                if action == DELETED:
                    deleted = True
                    break
                continue
            kind = <tuple>cached[1]
            path = prefix + path_in_run
            mtime = record[2] / _BILLION
            if type(mtime) is not float:
                raise _NotFast()
            append_only = (<tuple>kind)[1]
            entry = _new_entry(path, record[1], mtime, (<tuple>kind)[0], append_only)
            if append_only:
                hit = PyDict_GetItemWithError(memos, path)
                known = None if hit is NULL else <object>hit
                if (
                    known is not None
                    and record[2] < reuse_before_ns
                    and _same_key(known.key, record)
                ):
                    entry.size, entry.tail_hash = known.recorded_size, known.tail_hash
                    run_reused[path] = known
                else:
                    run_stale.append((entry, record))
            files.append(entry)
            value = PyFloat_AS_DOUBLE(mtime)
            if oldest is None:
                oldest = newest = mtime
                low = high = value
            elif value < low:
                oldest = mtime
                low = value
            elif value > high:
                newest = mtime
                high = value
        if deleted:
            built.append(None)
            continue
        reused.update(run_reused)
        stale.extend(run_stale)
        built.append(RunFiles(
            files,
            tuple(found),
            0.0 if oldest is None else oldest,
            0.0 if newest is None else newest,
        ))
    return Entries(built, reused, stale)


def build_file_entries(
    runs: Sequence[RunScan],
    memos: Mapping[str, FileMemo],
    reuse_before_ns: int,
    watched: tuple[str, ...] = (),
) -> Entries:
    if type(runs) is not list or type(memos) is not dict or type(watched) is not tuple \
            or type(reuse_before_ns) is not int \
            or any(type(name) is not str for name in <tuple>watched):
        return _pure.build_file_entries(runs, memos, reuse_before_ns, watched)
    try:
        return _build(<list>runs, <dict>memos, reuse_before_ns, <tuple>watched)
    except _NotFast:
        return _pure.build_file_entries(runs, memos, reuse_before_ns, watched)


# -- JSON ----------------------------------------------------------------------------------

cdef struct Buffer:
    PyObject *result   # the bytes object written into, resized as it fills; owned
    char *data         # its contents
    Py_ssize_t length
    Py_ssize_t capacity


cdef int _reserve(Buffer *buf, Py_ssize_t more) except -1:
    """Room for ``more`` bytes. The JSON is written straight into the ``bytes`` it is
    returned as, grown (and finally shrunk) in place: a large lab's manifest is 150 MB, and
    a copy of it costs as much again in fresh memory."""
    cdef Py_ssize_t wanted = buf.length + more
    cdef Py_ssize_t capacity = buf.capacity
    if wanted <= capacity:
        return 0
    while capacity < wanted:
        capacity = capacity * 2 if capacity else 1 << 16
    if buf.result == NULL:
        buf.result = _new_bytes(NULL, capacity)
    else:
        _PyBytes_Resize(&buf.result, capacity)  # on failure it is freed and NULL
    buf.data = _bytes_data(buf.result)
    buf.capacity = capacity
    return 0


cdef inline int _put(Buffer *buf, const char *text, Py_ssize_t length) except -1:
    if buf.length + length > buf.capacity:
        _reserve(buf, length)
    memcpy(buf.data + buf.length, text, length)
    buf.length += length
    return 0


cdef inline int _put_bytes(Buffer *buf, bytes data) except -1:
    return _put(buf, <const char *>data, len(data))


# bytes orjson escapes inside a string: control characters, '"' and '\'
cdef bint[256] _ESCAPED
for _code in range(256):
    _ESCAPED[_code] = _code < 0x20 or _code == 0x22 or _code == 0x5C


cdef int _put_integer(Buffer *buf, long long number) except -1:
    """Decimal digits of ``number`` (what ``snprintf("%lld")`` gives, without its cost)."""
    cdef char digits[24]
    cdef int at = 24
    cdef unsigned long long rest = <unsigned long long>number
    if number < 0:
        rest = 0 - rest
    while True:
        at -= 1
        digits[at] = <char>(48 + rest % 10)
        rest //= 10
        if rest == 0:
            break
    if number < 0:
        at -= 1
        digits[at] = b'-'
    return _put(buf, digits + at, 24 - at)


cdef struct Floats:
    const char *next   # the next float's text in orjson's encoding of all of them
    const char *end


cdef int _put_value(Buffer *buf, object value, Floats *floats) except -1:
    """``value`` as orjson encodes it: written directly when that is plain, a float from the
    batch orjson formatted (see :func:`_floats_of`), anything else by orjson itself."""
    cdef const char *text
    cdef const char *stop
    cdef Py_ssize_t length
    cdef Py_ssize_t k
    cdef int overflow
    cdef long long number
    if type(value) is str:
        try:
            text = PyUnicode_AsUTF8AndSize(value, &length)
        except UnicodeEncodeError:
            return _put_bytes(buf, _dumps(value))  # lone surrogates: orjson's own error
        for k in range(length):
            if _ESCAPED[<unsigned char>text[k]]:
                return _put_bytes(buf, _dumps(value))
        _reserve(buf, length + 2)
        buf.data[buf.length] = b'"'
        memcpy(buf.data + buf.length + 1, text, length)
        buf.data[buf.length + 1 + length] = b'"'
        buf.length += length + 2
        return 0
    if type(value) is float:
        text = floats.next
        stop = text
        while stop < floats.end and stop[0] != b',' and stop[0] != b']':
            stop += 1
        if stop >= floats.end:
            raise RuntimeError("float batch out of step with the experiments")
        floats.next = stop + 1
        return _put(buf, text, stop - text)
    if type(value) is int:
        number = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow:
            return _put_bytes(buf, _dumps(value))
        return _put_integer(buf, number)
    if value is True:
        return _put(buf, b"true", 4)
    if value is False:
        return _put(buf, b"false", 5)
    if value is None:
        return _put(buf, b"null", 4)
    return _put_bytes(buf, _dumps(value))


cdef inline int _put_field(Buffer *buf, bytes key, object value, Floats *floats) except -1:
    """``key`` (its JSON with the separator before it and the colon), then ``value``."""
    _put_bytes(buf, key)
    return _put_value(buf, value, floats)


cdef inline bint _fast_experiment(object exp):
    return type(exp) is ExperimentEntry and type(exp.files) is list


cdef inline object _field(object entry, Py_ssize_t k, str name):
    """Field ``k`` (``name``) of an exact ``FileEntry``, read from its slot; an unset slot
    goes through ``getattr`` so that it raises what Python raises."""
    cdef PyObject *value
    if _DIRECT_ENTRIES:
        value = (<PyObject **>(<char *><PyObject *>entry + _OFFSETS[k]))[0]
        if value is not NULL:
            return <object>value
    return getattr(entry, name)


cdef list _floats_of(object experiments):
    """Every ``float`` the fast path writes, in the order it writes them.

    orjson formats floats with its own shortest-repr algorithm, several times faster than
    CPython's ``repr``; encoding them all in one ``orjson.dumps`` call and copying each
    one's text gives its exact spelling at its speed.
    """
    cdef list found = []
    cdef Py_ssize_t k
    for k in range(len(experiments)):
        exp = experiments[k]
        if not _fast_experiment(exp):
            continue
        if type(exp.created_at) is float:
            found.append(exp.created_at)
        if type(exp.updated_at) is float:
            found.append(exp.updated_at)
        for entry in <list>exp.files:
            if type(entry) is FileEntry:
                mtime = _field(entry, 2, "mtime")
                if type(mtime) is float:
                    found.append(mtime)
    return found


cdef int _put_file(Buffer *buf, object entry, Floats *floats) except -1:
    if type(entry) is not FileEntry:
        return _put_bytes(buf, _dumps(entry.to_dict()))
    _put_field(buf, b'{"path":', _field(entry, 0, "path"), floats)
    _put_field(buf, b',"size":', _field(entry, 1, "size"), floats)
    _put_field(buf, b',"mtime":', _field(entry, 2, "mtime"), floats)
    _put_field(buf, b',"priority":', _field(entry, 3, "priority"), floats)
    _put_field(buf, b',"is_append_only":', _field(entry, 4, "is_append_only"), floats)
    tail_hash = _field(entry, 5, "tail_hash")
    if tail_hash is not None:
        _put_field(buf, b',"tail_hash":', tail_hash, floats)
    return _put(buf, b"}", 1)


cdef int _put_experiment(Buffer *buf, object exp, Floats *floats) except -1:
    cdef Py_ssize_t k
    if not _fast_experiment(exp):
        return _put_bytes(buf, _dumps(exp.to_dict()))
    files = <list>exp.files
    _put_field(buf, b'{"run_id":', exp.run_id, floats)
    _put_field(buf, b',"project":', exp.project, floats)
    _put_field(buf, b',"name":', exp.name, floats)
    path = exp.path
    if path is not None:
        _put_field(buf, b',"path":', path, floats)
    _put_field(buf, b',"status":', exp.status, floats)
    _put_field(buf, b',"created_at":', exp.created_at, floats)
    _put_field(buf, b',"updated_at":', exp.updated_at, floats)
    _put(buf, b',"files":[', 10)
    for k in range(len(<list>files)):
        if k:
            _put(buf, b",", 1)
        _put_file(buf, (<list>files)[k], floats)
    _put(buf, b"]", 1)
    tags = exp.tags
    if tags:
        _put(buf, b',"tags":', 8)
        _put_bytes(buf, _dumps(list(tags)))
    return _put(buf, b"}", 1)


def encode_experiments(experiments: Sequence[ExperimentEntry]) -> bytes:
    if type(experiments) is not list and type(experiments) is not tuple:
        return _pure.encode_experiments(experiments)
    cdef bytes float_text = _dumps(_floats_of(experiments))
    cdef Floats floats
    floats.next = <const char *>float_text + 1  # past the "["
    floats.end = <const char *>float_text + len(float_text)
    cdef Buffer buf
    buf.result = NULL
    buf.data = NULL
    buf.length = buf.capacity = 0
    cdef Py_ssize_t k
    try:
        _put(&buf, b"[", 1)
        for k in range(len(experiments)):
            if k:
                _put(&buf, b",", 1)
            _put_experiment(&buf, experiments[k], &floats)
        _put(&buf, b"]", 1)
        _PyBytes_Resize(&buf.result, buf.length)
        return <bytes>buf.result
    finally:
        Py_XDECREF(buf.result)


build_file_entries.__doc__ = _pure.build_file_entries.__doc__
encode_experiments.__doc__ = _pure.encode_experiments.__doc__
