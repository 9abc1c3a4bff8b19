# cython: language_level=3, binding=True, annotation_typing=False, boundscheck=True, wraparound=True
"""Compiled twin of :mod:`runicorn.core.tailhash`: tail windows read in C, hashed by BLAKE3
(or MD5, for manifests of 0.5.x generators).

Why this module exists: generating a manifest tail-hashes every append-only file of a lab,
tens of thousands of files. The pure module pays for a Python ``os.open``, ``os.pread`` and
``os.close`` call (and a ``bytes`` object) per file; here the files of a batch are opened
and read with ``open``/``pread`` in one stretch with the GIL released, straight into one
shared buffer, and only the hashing touches Python.

Why BLAKE3 through the ``blake3`` Python package, not a C API: the package (the official
Rust implementation behind PyO3) exposes no C API to call from here, and the alternative,
compiling the BLAKE3 C reference implementation into this extension, would mean vendoring
third-party code, which this project does not do (every line here is written for
runicorn). The package hashes a buffer without copying it, so each window is handed over
as a ``memoryview`` slice of the batch buffer; for 4 KiB windows the call costs far less
than the system calls it follows. The digest is computed exactly as the specification does
(``hexdigest(length=DIGEST_BYTES)``), so the two backends cannot disagree on the hash.

Why it is a twin: :mod:`runicorn.core.tailhash` is the specification. Constants and helpers
are imported from it and the docstring of ``hash_tails`` is copied from it at import.
Requests the fast path does not take (a size that is not an ``int``, a path with a NUL or
not encodable, an unusual ``cut_at_newline`` object, a ``window`` that is not an ``int``)
are handed to the specification one by one, in order, so even their errors are its own.
"""

import os
from concurrent.futures import ThreadPoolExecutor, wait

from blake3 import blake3

from cpython.bytearray cimport PyByteArray_AS_STRING
from libc.errno cimport errno, EINTR
from libc.stdlib cimport malloc, free
from libc.string cimport memmove

from runicorn._sys.cpu import usable_cores
from runicorn.core import tailhash as _pure
from runicorn.core.tailhash import (
    DIGEST_BYTES,
    LEGACY_TAIL_HASH_ALGORITHM,
    TAIL_HASH_ALGORITHM,
    TAIL_HASH_ALGORITHMS,
    TAIL_WINDOW,
    TailRequest,
    TailResult,
    digest,
    hasher_for,
)

__all__ = ["DIGEST_BYTES", "LEGACY_TAIL_HASH_ALGORITHM", "TAIL_HASH_ALGORITHM",
           "TAIL_HASH_ALGORITHMS", "TAIL_WINDOW", "TailRequest", "TailResult", "digest",
           "hash_tails", "hasher_for"]

cdef extern from "Python.h":
    bytes PyUnicode_EncodeFSDefault(object unicode)

cdef extern from "<fcntl.h>" nogil:
    int c_open "open"(const char *pathname, int flags)
    enum:
        O_RDONLY
        O_NOFOLLOW
        O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void *buf, size_t count, long long offset)
    int close(int fd)

cdef struct Job:
    const char *path
    long long size
    bint cut_at_newline
    char *slot            # room for min(size, window) bytes in the batch buffer
    long long end         # out: the size hashed up to
    long long length      # out: bytes of the window in the slot
    bint ok               # out: False means the result is None

# a batch holds this many window bytes before it is hashed (one big file may exceed it)
cdef long long BATCH_BYTES = 4 << 20
cdef long long MAX_SIZE = 1 << 62
# threads reading one batch's windows (the caller's and helpers): file opens are system calls
# that wait on the file system (a network round trip on NFS), so they overlap well
cdef int MAX_THREADS = 4


cdef int _pread_exact(int fd, char *buf, long long length, long long offset) noexcept nogil:
    """1 when ``length`` bytes at ``offset`` were read, 0 when the file is shorter, -1 on
    an error (both make the result ``None``)."""
    cdef ssize_t n
    while length > 0:
        n = pread(fd, buf, <size_t>length, offset)
        if n < 0:
            if errno == EINTR:
                continue
            return -1
        if n == 0:
            return 0
        buf += n
        length -= n
        offset += n
    return 1


cdef bint _tail_of_open_file(int fd, Job *job, long long window) noexcept nogil:
    cdef long long end = job.size
    cdef long long pos, start, k, head
    cdef bint have_window = False
    if job.cut_at_newline:
        end = 0
        pos = job.size
        while pos > 0:
            start = pos - window if pos > window else 0
            if _pread_exact(fd, job.slot, pos - start, start) != 1:
                return False
            k = pos - start - 1
            while k >= 0 and job.slot[k] != b'\n':
                k -= 1
            if k >= 0:
                end = start + k + 1
                # the slot holds [start, end) of the window that ends at ``end``: move it
                # to the back and read only the head that is missing (nothing when the
                # file ends with a complete line, a half line's length otherwise)
                head = start - (end - window if end > window else 0)
                if head > 0:
                    memmove(job.slot + head, job.slot, <size_t>(end - start))
                    if _pread_exact(fd, job.slot, head, start - head) != 1:
                        return False
                job.length = head + end - start
                have_window = True
                break
            pos = start
    if not have_window:
        start = end - window if end > window else 0
        if _pread_exact(fd, job.slot, end - start, start) != 1:
            return False
        job.length = end - start
    job.end = end
    return True


cdef void _run_job(Job *job, long long window) noexcept nogil:
    cdef int fd
    job.ok = False
    while True:
        fd = c_open(job.path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
        if fd >= 0 or errno != EINTR:
            break
    if fd < 0:
        return
    job.ok = _tail_of_open_file(fd, job, window)
    close(fd)


cdef extern from *:
    """
    static inline Py_ssize_t runicorn_claim(Py_ssize_t *next) {
        return __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
    }
    static inline void runicorn_close_claims(Py_ssize_t *next, Py_ssize_t count) {
        __atomic_store_n(next, count, __ATOMIC_RELAXED);
    }
    """
    Py_ssize_t runicorn_claim(Py_ssize_t *next) noexcept nogil
    void runicorn_close_claims(Py_ssize_t *next, Py_ssize_t count) noexcept nogil


cdef struct Work:
    Job *jobs
    Py_ssize_t count
    Py_ssize_t next       # the next job to claim, shared by every thread reading the batch
    long long window


cdef void _work(Work *work) noexcept nogil:
    """Claim and run jobs until none is left (each thread of a batch runs this)."""
    cdef Py_ssize_t k
    while True:
        k = runicorn_claim(&work.next)
        if k >= work.count:
            return
        _run_job(&work.jobs[k], work.window)


def _help(size_t address) -> None:
    """Body of a helper thread: read windows of the batch whose ``Work`` is at ``address``."""
    with nogil:
        _work(<Work *>address)


cdef void _join_helpers(Work *work, list started) except *:
    """Wait until no helper touches the batch any more, even after Ctrl+C: its jobs and
    buffer are freed when the caller returns. Claims are closed first, so each helper
    finishes at most the file it is reading."""
    runicorn_close_claims(&work.next, work.count)
    pending = set(started)
    while pending:
        try:
            pending = wait(pending)[1]
        except KeyboardInterrupt:
            continue  # the first interrupt is already on its way up; finish the cleanup


# A batch is shared with helper threads only when it has this many files: below it, starting
# them costs more than the system calls it spreads.
cdef Py_ssize_t MIN_JOBS_TO_SHARE = 64


cdef void _flush(list batch, list results, long long window, object pool, int helpers,
                 object hasher) except *:
    """Read the windows of a batch of ``(index, path bytes, size, cut)`` and hash them with
    ``hasher`` (``None``: BLAKE3-128, called directly)."""
    cdef Py_ssize_t count = len(batch)
    cdef Py_ssize_t k
    cdef long long total = 0
    cdef long long room
    cdef Job *jobs
    cdef char *base
    cdef bytearray buffer
    cdef bytes path
    cdef Work work
    if count == 0:
        return
    for item in batch:
        total += min(<long long>item[2], window)
    buffer = bytearray(total)
    base = PyByteArray_AS_STRING(buffer)
    jobs = <Job *>malloc(count * sizeof(Job))
    if jobs == NULL:
        raise MemoryError()
    try:
        total = 0
        for k in range(count):
            item = batch[k]
            path = item[1]  # kept alive by the batch list
            jobs[k].path = path
            jobs[k].size = item[2]
            jobs[k].cut_at_newline = item[3]
            jobs[k].slot = base + total
            room = min(jobs[k].size, window)
            total += room
        work.jobs = jobs
        work.count = count
        work.next = 0
        work.window = window
        started = []
        if pool is not None and count >= MIN_JOBS_TO_SHARE:
            started = [pool.submit(_help, <size_t>&work) for _ in range(helpers)]
        with nogil:
            _work(&work)
        _join_helpers(&work, started)
        for future in started:
            future.result()  # a helper's exception, if any, is the caller's
        view = memoryview(buffer)
        for k in range(count):
            if jobs[k].ok:
                offset = jobs[k].slot - base
                window_bytes = view[offset:offset + jobs[k].length]
                results[batch[k][0]] = (
                    jobs[k].end,
                    blake3(window_bytes).hexdigest(length=DIGEST_BYTES)
                    if hasher is None else hasher(window_bytes),
                )
        view.release()
    finally:
        free(jobs)


cdef inline str _join(str root, str rel_path):
    """``os.path.join(root, rel_path)`` for two ``str`` on POSIX, without the Python call."""
    if rel_path.startswith("/"):
        return rel_path
    if not root or root.endswith("/"):
        return root + rel_path
    return root + "/" + rel_path


def hash_tails(
    root: str,
    requests: Sequence[TailRequest],
    window: int = TAIL_WINDOW,
    algorithm: str = TAIL_HASH_ALGORITHM,
) -> list[TailResult | None]:
    if window < 1:
        raise ValueError(f"window must be at least 1 byte, got {window}")
    hasher = hasher_for(algorithm)
    if type(window) is not int or window > MAX_SIZE:
        return _pure.hash_tails(root, requests, window, algorithm)
    if algorithm == TAIL_HASH_ALGORITHM and type(algorithm) is str:
        hasher = None
    cdef long long c_window = window
    cdef int helpers = min(MAX_THREADS, usable_cores()) - 1
    pool = None
    if helpers > 0 and (not hasattr(requests, "__len__") or len(requests) >= MIN_JOBS_TO_SHARE):
        pool = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="runicorn-tails")
    try:
        return _hash_all(root, requests, window, c_window, pool, helpers, algorithm, hasher)
    finally:
        if pool is not None:
            pool.shutdown()


cdef list _hash_all(object root, object requests, object window, long long c_window,
                    object pool, int helpers, object algorithm, object hasher):
    cdef list results = []
    cdef list batch = []
    cdef long long batch_bytes = 0
    cdef Py_ssize_t index = 0
    for request in requests:
        if type(request) is not tuple or len(<tuple>request) != 3:
            # unpacking errors are worded by CPython, not by Cython: ask the specification
            results.append(_pure.hash_tails(root, [request], window, algorithm)[0])
            index += 1
            continue
        rel_path, size, cut_at_newline = <tuple>request
        if size < 0:
            raise ValueError(f"size of {rel_path!r} must not be negative, got {size}")
        results.append(None)
        if type(root) is str and type(rel_path) is str:
            path = _join(<str>root, <str>rel_path)
        else:
            path = os.path.join(root, rel_path)
        encoded = None
        if type(size) is int and size <= MAX_SIZE and (
                cut_at_newline is None or type(cut_at_newline) is bool
                or type(cut_at_newline) is int):
            if type(path) is str:
                try:
                    encoded = PyUnicode_EncodeFSDefault(path)
                except UnicodeError:
                    encoded = None
            elif type(path) is bytes:
                encoded = path
            if encoded is not None and b"\0" in encoded:
                encoded = None
        if encoded is None:
            # not the fast path's kind of request: the specification answers it
            results[index] = _pure.hash_tails(
                root, [(rel_path, size, cut_at_newline)], window, algorithm
            )[0]
        else:
            batch.append((index, encoded, size, bool(cut_at_newline)))
            batch_bytes += min(<long long>size, c_window)
            if batch_bytes >= BATCH_BYTES:
                _flush(batch, results, c_window, pool, helpers, hasher)
                batch = []
                batch_bytes = 0
        index += 1
    _flush(batch, results, c_window, pool, helpers, hasher)
    return results


hash_tails.__doc__ = _pure.hash_tails.__doc__
