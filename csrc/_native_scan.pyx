# cython: language_level=3, binding=True, annotation_typing=False
"""Compiled twin of :mod:`runicorn.core.scan`: the experiments-root walk in C.

Why this module exists: the scan is one ``lstat`` per file of a lab, and on a lab server
that is a hundred thousand system calls before a manifest can be written. The pure module
pays for a ``DirEntry`` object, a path string and a ``stat_result`` per entry; this one
walks each project with ``openat``, ``getdents64`` (``readdir`` where Linux's call is
missing; glibc's ``fdopendir`` would add an ``fstat`` and an ``fcntl`` per directory) and
``fstatat`` relative to the directory's file descriptor (no path is rebuilt or re-resolved
per call), trusts ``d_type`` at the layout levels (a ``stat`` only when the file system
answers ``DT_UNKNOWN``), and collects plain C records with the GIL released. Python objects are built afterwards, one
tuple per file, with the GIL held. With ``threads > 1`` each project is walked by a
worker thread; since the walk holds no GIL, the workers really run at the same time (on
NFS or Lustre every ``stat`` is a network round trip, and several can be in flight).

Why it is a twin: :mod:`runicorn.core.scan` is the specification. The result types,
reason strings and helper names are imported from it, the docstring of
``scan_experiments`` is copied from it at import, and the test suite runs both against
random trees and requires identical results. Names are decoded exactly as ``os.scandir``
decodes them (the file-system encoding with ``surrogateescape``) and all sorting happens on
the decoded ``str`` objects, so undecodable names sort like the pure module sorts them.
Arguments other than a ``str`` path (or an ``os.PathLike`` giving one) are handed to the
specification, so even their errors are the pure module's.
"""

import os
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor

from libc.errno cimport errno, ENOENT, ENOTDIR, ELOOP, EINTR, ENOSYS
from libc.stdlib cimport malloc, realloc, free, qsort
from libc.string cimport memcmp, memcpy, strcmp, strlen

from runicorn.core import scan as _pure
from runicorn.core.scan import (
    MAX_READ_BYTES,
    POLICY_REASONS,
    REASON_NOT_A_DIRECTORY,
    REASON_NOT_REGULAR,
    REASON_SYMLINK,
    REASON_VANISHED,
    FileStat,
    Problem,
    RunScan,
    ScanResult,
    reason_unreadable,
)
from runicorn.format import names as _names
from runicorn.format.layout import RUNS_DIRNAME, run_prefix as _run_prefix

__all__ = [
    "MAX_READ_BYTES",
    "POLICY_REASONS",
    "REASON_NOT_A_DIRECTORY",
    "REASON_NOT_REGULAR",
    "REASON_SYMLINK",
    "REASON_VANISHED",
    "FileStat",
    "Problem",
    "RunScan",
    "ScanResult",
    "reason_unreadable",
    "scan_experiments",
]

cdef extern from "Python.h":
    object PyUnicode_DecodeFSDefaultAndSize(const char *s, Py_ssize_t size)
    bytes PyBytes_FromStringAndSize(const char *s, Py_ssize_t size)

cdef extern from "<dirent.h>" nogil:
    ctypedef struct DIR:
        pass
    struct dirent:
        unsigned char d_type
        char d_name[1]
    DIR *fdopendir(int fd)
    dirent *readdir(DIR *dirp)
    int closedir(DIR *dirp)
    int dirfd(DIR *dirp)
    enum:
        DT_UNKNOWN
        DT_DIR
        DT_LNK
        DT_REG

cdef extern from *:
    """
    #include <errno.h>
    #if defined(__linux__)
    #include <sys/syscall.h>
    #include <unistd.h>
    /* One getdents64 call: the entries of a directory without the fstat and fcntl that
       glibc's fdopendir spends on every directory. */
    static long runicorn_getdents(int fd, char *buf, size_t size) {
        return syscall(SYS_getdents64, fd, buf, size);
    }
    #else
    static long runicorn_getdents(int fd, char *buf, size_t size) {
        (void)fd; (void)buf; (void)size;
        errno = ENOSYS;
        return -1;
    }
    #endif
    struct runicorn_dirent64 {
        unsigned long long d_ino;
        long long d_off;
        unsigned short d_reclen;
        unsigned char d_type;
        char d_name[1];
    };
    """
    long runicorn_getdents(int fd, char *buf, size_t size) nogil
    struct runicorn_dirent64:
        unsigned short d_reclen
        unsigned char d_type
        char d_name[1]

cdef extern from "<fcntl.h>" nogil:
    int openat(int dirfd, const char *pathname, int flags)
    enum:
        O_RDONLY
        O_DIRECTORY
        O_NOFOLLOW
        O_NONBLOCK
        O_CLOEXEC
        AT_FDCWD
        AT_SYMLINK_NOFOLLOW

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int dup(int fd)
    Py_ssize_t read(int fd, void *buf, size_t count)

cdef extern from "<sys/stat.h>" nogil:
    ctypedef long long c_off "off_t"
    ctypedef unsigned long long c_ino "ino_t"
    ctypedef unsigned int c_mode "mode_t"
    cdef struct c_timespec "timespec":
        long long tv_sec
        long tv_nsec
    ctypedef struct c_stat "struct stat":
        c_mode st_mode
        c_off st_size
        c_ino st_ino
        c_timespec st_mtim
        c_timespec st_ctim
    int fstatat(int dirfd, const char *pathname, c_stat *buf, int flags)
    bint S_ISREG(c_mode m)
    bint S_ISDIR(c_mode m)
    bint S_ISLNK(c_mode m)


# ---------------------------------------------------------------------------------------
# C-level records, collected without the GIL

cdef enum:
    K_EXPERIMENT = 0   # text: the experiment name; the runs that follow belong to it
    K_RUN = 1          # text: the run id; the files that follow belong to it
    K_FILE = 2         # text: path in run; stat fields
    K_PROBLEM = 3      # text: path relative to the root; code: reason
    K_CONTENT = 4      # text: the bytes of the file recorded just before

# problem codes: > 0 is an errno ("unreadable: <strerror>")
cdef enum:
    R_SYMLINK = -1
    R_NOT_A_DIRECTORY = -2
    R_NOT_REGULAR = -3
    R_VANISHED = -4
    R_TOO_DEEP = -5
    R_PATH_TOO_LONG = -6
    R_NAME = -10       # R_NAME - k: the name rule's reason NAME_REASONS[k]

cdef struct Record:
    int kind
    int code
    Py_ssize_t offset
    Py_ssize_t length
    long long size
    long long mtime_s
    long long mtime_ns
    long long ctime_s
    long long ctime_ns
    unsigned long long inode

cdef struct Collector:
    Record *records
    Py_ssize_t n_records
    Py_ssize_t cap_records
    char *text
    Py_ssize_t n_text
    Py_ssize_t cap_text
    char *rel          # the current path relative to the root (problem paths, paths in run)
    Py_ssize_t n_rel
    Py_ssize_t cap_rel
    bint failed        # out of memory
    const char *read_names   # run-level names whose bytes are wanted: NUL-separated,
                             # ended by an empty name; NULL for none
    char *read_buffer        # MAX_READ_BYTES + 1, allocated when first needed


cdef bint _grow(void **buffer, Py_ssize_t *capacity, Py_ssize_t needed, size_t item) noexcept nogil:
    cdef Py_ssize_t new_capacity = capacity[0] if capacity[0] > 0 else 64
    cdef void *grown
    if needed <= capacity[0]:
        return True
    while new_capacity < needed:
        new_capacity *= 2
    grown = realloc(buffer[0], <size_t>new_capacity * item)
    if grown == NULL:
        return False
    buffer[0] = grown
    capacity[0] = new_capacity
    return True


cdef Record *_record(Collector *c, int kind, const char *text, Py_ssize_t length) noexcept nogil:
    """Append a record whose text is ``text[:length]``; NULL (and ``failed``) without memory."""
    cdef Record *rec
    if c.failed:
        return NULL
    if not _grow(<void **>&c.records, &c.cap_records, c.n_records + 1, sizeof(Record)) or \
            not _grow(<void **>&c.text, &c.cap_text, c.n_text + length, 1):
        c.failed = True
        return NULL
    rec = &c.records[c.n_records]
    c.n_records += 1
    rec.kind = kind
    rec.code = 0
    rec.offset = c.n_text
    rec.length = length
    if length:
        memcpy(c.text + c.n_text, text, length)
    c.n_text += length
    return rec


cdef void _problem(Collector *c, int code) noexcept nogil:
    cdef Record *rec = _record(c, K_PROBLEM, c.rel, c.n_rel)
    if rec != NULL:
        rec.code = code


cdef Py_ssize_t _max_read = MAX_READ_BYTES
cdef Py_ssize_t _max_name = _names.MAX_NAME_BYTES
cdef Py_ssize_t _max_path = _names.MAX_PATH_BYTES
cdef Py_ssize_t _max_depth = _names.MAX_DEPTH
cdef bytes _temp_prefix = os.fsencode(_names.TEMP_PREFIX)
cdef const char *_c_temp_prefix = _temp_prefix
cdef Py_ssize_t _temp_prefix_length = len(_temp_prefix)
cdef dict _name_codes = {reason: R_NAME - k for k, reason in enumerate(_names.NAME_REASONS)}


cdef int _slow_name_code(const char *name, Py_ssize_t length) noexcept with gil:
    """The name rule (the specification's function) for a name the fast check could not
    clear: decoded as ``os.scandir`` decodes it."""
    try:
        reason = _names.name_problem(PyUnicode_DecodeFSDefaultAndSize(name, length))
        return 0 if reason is None else _name_codes[reason]
    except BaseException:  # never raised by the rule; an undecodable name is refused
        return _name_codes[_names.REASON_NOT_UTF8]


cdef int _name_code(const char *name, Py_ssize_t length) noexcept nogil:
    """0 when the name rule lets ``name`` be listed, else its problem code. A short
    printable ASCII name without a backslash and not reserved (nearly every name) is decided
    here without the GIL; any other goes to :func:`runicorn.format.names.name_problem`."""
    cdef Py_ssize_t k
    cdef unsigned char byte
    if length > _max_name:
        return _slow_name_code(name, length)
    for k in range(length):
        byte = <unsigned char>name[k]
        if byte < 0x20 or byte > 0x7e or byte == b'\\':
            return _slow_name_code(name, length)
    if length >= _temp_prefix_length and \
            memcmp(name, _c_temp_prefix, <size_t>_temp_prefix_length) == 0:
        return _slow_name_code(name, length)
    return 0


cdef int _entry_code(Collector *c, const char *name, Py_ssize_t length) noexcept nogil:
    """0 when an entry just pushed onto ``c.rel`` may be listed, else its problem code: the
    name rule, then the depth and length of its path (as the pure module's ``_refused``)."""
    cdef int code = _name_code(name, length)
    cdef Py_ssize_t k, depth
    if code != 0:
        return code
    if c.n_rel < _max_depth * 2 - 1 and c.n_rel <= _max_path:
        return 0
    depth = 1
    for k in range(c.n_rel):
        if c.rel[k] == b'/':
            depth += 1
    if depth > _max_depth:
        return R_TOO_DEEP
    if c.n_rel > _max_path:
        return R_PATH_TOO_LONG
    return 0


cdef bint _wanted(const Collector *c, const char *name) noexcept nogil:
    cdef const char *wanted = c.read_names
    if wanted == NULL:
        return False
    while wanted[0] != 0:
        if strcmp(wanted, name) == 0:
            return True
        wanted += strlen(wanted) + 1
    return False


cdef void _read_content(Collector *c, int dir_fd, const char *name,
                        long long size) noexcept nogil:
    """Record the bytes of a small file (as ``_read_whole``): nothing when it cannot be
    opened or read, or holds more than ``MAX_READ_BYTES``.

    A read that stops short exactly at the ``size`` just stat'ed is taken as the end of the
    file, without the empty read that would confirm it: one system call less per file read
    (a round trip on NFS). A file that grows meanwhile is read on, as the pure module does."""
    cdef int fd
    cdef Py_ssize_t filled = 0
    cdef Py_ssize_t got
    if c.read_buffer == NULL:
        c.read_buffer = <char *>malloc(<size_t>_max_read + 1)
        if c.read_buffer == NULL:
            c.failed = True
            return
    while True:
        fd = openat(dir_fd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        if fd >= 0 or errno != EINTR:
            break
    if fd < 0:
        return
    while filled <= _max_read:
        got = read(fd, c.read_buffer + filled, <size_t>(_max_read + 1 - filled))
        if got < 0:
            if errno == EINTR:
                continue
            filled = -1
            break
        if got == 0:
            break
        filled += got
        if filled == size and got < _max_read + 1 - (filled - got):
            break
    close(fd)
    if 0 <= filled <= _max_read:
        _record(c, K_CONTENT, c.read_buffer, filled)


cdef Py_ssize_t _push(Collector *c, const char *name, Py_ssize_t length) noexcept nogil:
    """Append ``/name`` (or ``name`` at the top) to the relative path; return the old length."""
    cdef Py_ssize_t old = c.n_rel
    cdef Py_ssize_t sep = 1 if old > 0 else 0
    if not _grow(<void **>&c.rel, &c.cap_rel, old + sep + length + 1, 1):
        c.failed = True
        return old
    if sep:
        c.rel[old] = b'/'
    memcpy(c.rel + old + sep, name, length)
    c.n_rel = old + sep + length
    c.rel[c.n_rel] = 0
    return old


cdef inline void _pop(Collector *c, Py_ssize_t old) noexcept nogil:
    c.n_rel = old
    if c.rel != NULL:
        c.rel[old] = 0


cdef int _list_error(int error) noexcept nogil:
    """The problem code of a directory that could not be listed (as ``_list_dir``)."""
    if error == ENOENT:
        return R_VANISHED
    if error == ENOTDIR:
        return R_NOT_A_DIRECTORY
    return error


# A directory listing read completely before anything in it is looked at, as the pure
# module sorts the whole listing first: a listing that fails half way yields no entries.

cdef struct Listing:
    char *names        # NUL-terminated names, back to back
    Py_ssize_t n_names
    Py_ssize_t cap_names
    Py_ssize_t *offsets
    unsigned char *types
    Py_ssize_t count
    Py_ssize_t cap


cdef int _add_entry(Listing *out, const char *name, unsigned char d_type) noexcept nogil:
    """Append one entry (``.`` and ``..`` are dropped); -1 without memory."""
    cdef Py_ssize_t length
    cdef Py_ssize_t cap_types
    if name[0] == b'.' and (name[1] == 0 or (name[1] == b'.' and name[2] == 0)):
        return 0
    length = strlen(name)
    cap_types = out.cap
    if not _grow(<void **>&out.names, &out.cap_names, out.n_names + length + 1, 1) or \
            not _grow(<void **>&out.offsets, &out.cap, out.count + 1, sizeof(Py_ssize_t)):
        return -1
    if out.cap != cap_types:
        cap_types = out.count
        if not _grow(<void **>&out.types, &cap_types, out.cap, 1):
            return -1
    memcpy(out.names + out.n_names, name, length + 1)
    out.offsets[out.count] = out.n_names
    out.types[out.count] = d_type
    out.n_names += length + 1
    out.count += 1
    return 0


cdef int _read_listing_stream(DIR *d, Listing *out) noexcept nogil:
    """Portable reading with readdir; 0, the errno that stopped it, or -1 without memory."""
    cdef dirent *entry
    while True:
        errno = 0
        entry = readdir(d)
        if entry == NULL:
            return errno
        if _add_entry(out, entry.d_name, entry.d_type) != 0:
            return -1


cdef enum:
    DENTS_BUFFER = 32768


cdef int _read_listing(int fd, Listing *out) noexcept nogil:
    """Read every entry of the open directory ``fd`` except ``.`` and ``..``, completely,
    before anything in it is looked at (as the pure module sorts the whole listing first:
    a listing that fails half way yields no entries). 0, an errno, or -1 without memory."""
    cdef char *buffer
    cdef long filled, position
    cdef runicorn_dirent64 *entry
    cdef int error = 0
    cdef int copy
    cdef DIR *d
    out.names = NULL
    out.offsets = NULL
    out.types = NULL
    out.n_names = out.cap_names = out.count = out.cap = 0
    buffer = <char *>malloc(DENTS_BUFFER)
    if buffer == NULL:
        return -1
    while True:
        filled = runicorn_getdents(fd, buffer, DENTS_BUFFER)
        if filled < 0:
            error = errno
            if error == EINTR:
                continue
            break
        if filled == 0:
            break
        position = 0
        while position < filled:
            entry = <runicorn_dirent64 *>(buffer + position)
            if _add_entry(out, entry.d_name, entry.d_type) != 0:
                free(buffer)
                return -1
            position += entry.d_reclen
    free(buffer)
    if error != ENOSYS:
        return error
    # no getdents64 on this system: a stream on a duplicate, so that ``fd`` stays open
    copy = dup(fd)
    if copy < 0:
        return errno
    d = fdopendir(copy)
    if d == NULL:
        error = errno
        close(copy)
        return error
    error = _read_listing_stream(d, out)
    closedir(d)
    return error


cdef void _free_listing(Listing *listing) noexcept nogil:
    free(listing.names)
    free(listing.offsets)
    free(listing.types)


cdef int _open_listing(Collector *c, int parent, const char *name, Listing *out,
                       int *code) noexcept nogil:
    """Open ``name`` below ``parent`` and read all of it: the directory's fd (to close), or
    -1 with ``code`` the problem the pure module would report there (0 and ``c.failed``
    when out of memory)."""
    cdef int fd
    cdef int error
    cdef c_stat st
    code[0] = 0
    while True:
        fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        if fd >= 0 or errno != EINTR:
            break
    if fd < 0:
        error = errno
        if error == ELOOP or error == ENOTDIR:
            # O_NOFOLLOW refuses a symbolic link as the last component, with ELOOP, or with
            # ENOTDIR when O_DIRECTORY is checked first: one lstat tells which it was
            if fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) != 0:
                error = errno
            elif S_ISLNK(st.st_mode):
                code[0] = R_SYMLINK
                return -1
            elif not S_ISDIR(st.st_mode):
                error = ENOTDIR
        code[0] = _list_error(error)
        return -1
    error = _read_listing(fd, out)
    if error != 0:
        _free_listing(out)
        close(fd)
        if error == -1:
            c.failed = True
        else:
            code[0] = _list_error(error)
        return -1
    return fd


cdef int _kind_of(int dir_fd, const char *name, unsigned char d_type) noexcept nogil:
    """``DT_LNK``, ``DT_DIR`` or ``DT_UNKNOWN`` (anything else, or a failed lstat) for an
    entry at a layout level; a stat only when the file system did not say."""
    cdef c_stat st
    if d_type == DT_LNK or d_type == DT_DIR:
        return d_type
    if d_type != DT_UNKNOWN:
        return DT_UNKNOWN
    if fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0:
        return DT_UNKNOWN
    if S_ISLNK(st.st_mode):
        return DT_LNK
    if S_ISDIR(st.st_mode):
        return DT_DIR
    return DT_UNKNOWN


cdef void _scan_run_files(Collector *c, int parent, const char *name,
                          Py_ssize_t in_run_start, bint run_level) noexcept nogil:
    """Record every regular file below ``name`` (a run directory or a directory inside one);
    ``c.rel`` is the directory's path, its part from ``in_run_start`` the path in the run.
    In the run directory itself (``run_level``) the wanted files' bytes are recorded too."""
    cdef Listing listing
    cdef int code
    cdef int fd = _open_listing(c, parent, name, &listing, &code)
    if fd < 0:
        if code:
            _problem(c, code)
        return
    _scan_listed_files(c, fd, &listing, in_run_start, run_level)
    close(fd)
    _free_listing(&listing)


cdef void _scan_listed_files(Collector *c, int fd, Listing *listing_ptr,
                             Py_ssize_t in_run_start, bint run_level) noexcept nogil:
    """:func:`_scan_run_files` of a directory already open (``fd``) and listed; the caller
    closes and frees both."""
    cdef Listing listing = listing_ptr[0]
    cdef Py_ssize_t k, old, length
    cdef int code
    cdef const char *entry
    cdef unsigned char d_type
    cdef c_stat st
    cdef Record *rec
    for k in range(listing.count):
        if c.failed:
            break
        entry = listing.names + listing.offsets[k]
        d_type = listing.types[k]
        length = strlen(entry)
        old = _push(c, entry, length)
        code = _entry_code(c, entry, length)
        if code != 0:
            _problem(c, code)
        elif d_type == DT_DIR:
            _scan_run_files(c, fd, entry, in_run_start, False)
        elif d_type == DT_LNK:
            _problem(c, R_SYMLINK)
        elif d_type != DT_REG and d_type != DT_UNKNOWN:
            _problem(c, R_NOT_REGULAR)
        elif fstatat(fd, entry, &st, AT_SYMLINK_NOFOLLOW) != 0:
            _problem(c, R_VANISHED if errno == ENOENT else errno)
        elif S_ISREG(st.st_mode):
            rec = _record(c, K_FILE, c.rel + in_run_start, c.n_rel - in_run_start)
            if rec != NULL:
                rec.size = st.st_size
                rec.mtime_s = st.st_mtim.tv_sec
                rec.mtime_ns = st.st_mtim.tv_nsec
                rec.ctime_s = st.st_ctim.tv_sec
                rec.ctime_ns = st.st_ctim.tv_nsec
                rec.inode = st.st_ino
                if run_level and st.st_size <= _max_read and _wanted(c, entry):
                    _read_content(c, fd, entry, st.st_size)
        elif S_ISDIR(st.st_mode):
            _scan_run_files(c, fd, entry, in_run_start, False)
        elif S_ISLNK(st.st_mode):
            _problem(c, R_SYMLINK)
        else:
            _problem(c, R_NOT_REGULAR)
        _pop(c, old)


cdef bint _is_run_listing(const Listing *listing) noexcept nogil:
    """Whether a directory below ``runs/`` is a run: it holds ``meta.json`` or
    ``status.json`` (``RUN_MARKERS``), of any type."""
    cdef Py_ssize_t k
    cdef const char *entry
    for k in range(listing.count):
        entry = listing.names + listing.offsets[k]
        if strcmp(entry, b"meta.json") == 0 or strcmp(entry, b"status.json") == 0:
            return True
    return False


cdef void _walk_run_paths(Collector *c, int fd, const Listing *listing,
                          Py_ssize_t path_start) noexcept nogil:
    """The runs-path layout below one path component (``fd``, listed): each visible
    subdirectory is a run when it holds a run marker, else a path component walked on.
    ``c.rel`` is the component's path from the root; from ``path_start`` it is the run
    path (``path_start`` past its end: the empty path)."""
    cdef Listing child
    cdef int code
    cdef int child_fd
    cdef Py_ssize_t k, old, length, path_length
    cdef const char *entry
    cdef int kind
    for k in range(listing.count):
        if c.failed:
            break
        entry = listing.names + listing.offsets[k]
        if entry[0] == b'.':
            continue
        length = strlen(entry)
        kind = _kind_of(fd, entry, listing.types[k])
        path_length = c.n_rel - path_start if c.n_rel > path_start else 0
        old = _push(c, entry, length)
        if kind == DT_LNK:
            _problem(c, R_SYMLINK)
        elif kind == DT_DIR and _entry_code(c, entry, length) != 0:
            _problem(c, _entry_code(c, entry, length))
        elif kind == DT_DIR:
            child_fd = _open_listing(c, fd, entry, &child, &code)
            if child_fd < 0:
                if code:
                    _problem(c, code)
            else:
                if _is_run_listing(&child):
                    _record(c, K_EXPERIMENT, c.rel + path_start, path_length)
                    _record(c, K_RUN, entry, length)
                    _scan_listed_files(c, child_fd, &child, c.n_rel + 1, True)
                else:
                    _walk_run_paths(c, child_fd, &child, path_start)
                close(child_fd)
                _free_listing(&child)
        _pop(c, old)


cdef void _scan_run_path_unit(Collector *c, int root_fd, const char *rel_path,
                              Py_ssize_t path_start) noexcept nogil:
    """One unit of the runs-path layout: ``runs/<name>`` (``rel_path``, relative to the
    root), a run itself or the first component of runs' paths; ``path_start`` is where the
    name starts in it."""
    cdef Listing listing
    cdef int code
    cdef int fd
    _push(c, rel_path, strlen(rel_path))
    fd = _open_listing(c, root_fd, rel_path, &listing, &code)
    if fd < 0:
        if code:
            _problem(c, code)
        return
    if _is_run_listing(&listing):
        _record(c, K_EXPERIMENT, c.rel, 0)
        _record(c, K_RUN, c.rel + path_start, c.n_rel - path_start)
        _scan_listed_files(c, fd, &listing, c.n_rel + 1, True)
    else:
        _walk_run_paths(c, fd, &listing, path_start)
    close(fd)
    _free_listing(&listing)


cdef void _scan_runs(Collector *c, int project_fd, const char *runs_path) noexcept nogil:
    """Walk ``<name>/runs`` (``runs_path``, relative to the project); ``c.rel`` is its path."""
    cdef Listing listing
    cdef int code
    cdef int fd = _open_listing(c, project_fd, runs_path, &listing, &code)
    cdef Py_ssize_t k, old, length
    cdef const char *entry
    cdef int kind
    if fd < 0:
        # no runs directory: an experiment without runs yet, not a problem
        if code and code != R_VANISHED:
            _problem(c, code)
        return
    for k in range(listing.count):
        if c.failed:
            break
        entry = listing.names + listing.offsets[k]
        if entry[0] == b'.':
            continue
        length = strlen(entry)
        old = _push(c, entry, length)
        kind = _kind_of(fd, entry, listing.types[k])
        if kind == DT_LNK:
            _problem(c, R_SYMLINK)
        elif kind == DT_DIR and _entry_code(c, entry, length) != 0:
            _problem(c, _entry_code(c, entry, length))
        elif kind == DT_DIR:
            _record(c, K_RUN, entry, length)
            _scan_run_files(c, fd, entry, c.n_rel + 1, True)
        else:
            _problem(c, R_NOT_A_DIRECTORY)
        _pop(c, old)
    close(fd)
    _free_listing(&listing)


cdef void _scan_project(Collector *c, int root_fd, const char *project,
                        const char *runs_name) noexcept nogil:
    cdef Listing listing
    cdef int code
    cdef int fd
    cdef Py_ssize_t k, old, old_exp, length, runs_length
    cdef const char *entry
    cdef char *runs_path = NULL
    cdef Py_ssize_t runs_cap = 0
    cdef int kind
    _push(c, project, strlen(project))
    fd = _open_listing(c, root_fd, project, &listing, &code)
    if fd < 0:
        if code:
            _problem(c, code)
        return
    runs_length = strlen(runs_name)
    for k in range(listing.count):
        if c.failed:
            break
        entry = listing.names + listing.offsets[k]
        if entry[0] == b'.':
            continue
        length = strlen(entry)
        kind = _kind_of(fd, entry, listing.types[k])
        old_exp = _push(c, entry, length)
        if kind == DT_LNK:
            _problem(c, R_SYMLINK)
        elif kind == DT_DIR and _entry_code(c, entry, length) != 0:
            _problem(c, _entry_code(c, entry, length))
        elif kind == DT_DIR:
            # "<name>/runs" opened in one call: O_NOFOLLOW applies to its last component
            # only, which is what an lstat of the runs path examines in the pure module
            if not _grow(<void **>&runs_path, &runs_cap, length + runs_length + 2, 1):
                c.failed = True
                break
            memcpy(runs_path, entry, length)
            runs_path[length] = b'/'
            memcpy(runs_path + length + 1, runs_name, runs_length + 1)
            _record(c, K_EXPERIMENT, entry, length)
            old = _push(c, runs_name, runs_length)
            _scan_runs(c, fd, runs_path)
            _pop(c, old)
        _pop(c, old_exp)
    free(runs_path)
    close(fd)
    _free_listing(&listing)


# a file record of the run being converted, and its name's bytes to sort it by
cdef struct NameRef:
    const char *text
    Py_ssize_t length
    Record *rec


cdef int _by_name_bytes(const void *left, const void *right) noexcept nogil:
    cdef const NameRef *a = <const NameRef *>left
    cdef const NameRef *b = <const NameRef *>right
    cdef Py_ssize_t shorter = a.length if a.length < b.length else b.length
    cdef int order = memcmp(a.text, b.text, <size_t>shorter)
    if order != 0:
        return order
    return (a.length > b.length) - (a.length < b.length)


cdef void _emit_files(list files, NameRef *pending, Py_ssize_t n) except *:
    """Append the records of one run to ``files`` as tuples, sorted by name.

    They are made in the order of their names' bytes, which is the order of the ``str``
    except where undecodable bytes became surrogates; the ``list.sort`` after it settles
    those (and costs one pass over a list that is already sorted)."""
    cdef Py_ssize_t k
    cdef Record *rec
    if n == 0:
        return
    qsort(pending, <size_t>n, sizeof(NameRef), _by_name_bytes)
    for k in range(n):
        rec = pending[k].rec
        files.append((
            PyUnicode_DecodeFSDefaultAndSize(pending[k].text, pending[k].length),
            rec.size,
            _ns(rec.mtime_s, rec.mtime_ns),
            _ns(rec.ctime_s, rec.ctime_ns),
            rec.inode,
        ))
    files.sort()  # path_in_run is unique within a run: only it is ever compared


cdef class _Project:
    """One project walked into C records (without the GIL), then turned into tuples."""

    cdef Collector c
    cdef bytes name_bytes
    cdef str name
    cdef bytes read_names   # keeps c.read_names alive
    cdef bint run_path_unit  # name_bytes is runs/<name> of the runs-path layout

    def __cinit__(self):
        self.c.records = NULL
        self.c.text = NULL
        self.c.rel = NULL
        self.c.n_records = self.c.cap_records = 0
        self.c.n_text = self.c.cap_text = 0
        self.c.n_rel = self.c.cap_rel = 0
        self.c.failed = False
        self.run_path_unit = False
        self.c.read_names = NULL
        self.c.read_buffer = NULL

    def __dealloc__(self):
        free(self.c.read_buffer)
        free(self.c.records)
        free(self.c.text)
        free(self.c.rel)

    cdef tuple scan(self, int root_fd, bytes runs_name):
        cdef const char *project = self.name_bytes
        cdef const char *runs = runs_name
        cdef bint run_paths = self.run_path_unit
        cdef Py_ssize_t path_start = len(runs_name) + 1
        if self.read_names is not None:
            self.c.read_names = self.read_names
        with nogil:
            if run_paths:
                _scan_run_path_unit(&self.c, root_fd, project, path_start)
            else:
                _scan_project(&self.c, root_fd, project, runs)
        if self.c.failed:
            raise MemoryError("out of memory while scanning " + repr(self.name))
        return self.convert()

    cdef tuple convert(self):
        cdef list runs = []
        cdef list problems = []
        cdef dict contents = {}
        cdef list files = None
        cdef Py_ssize_t k
        cdef Record *rec
        cdef Record *last_file = NULL
        cdef str project = self.name
        cdef object experiment = None
        cdef object run_id = None
        cdef object prefix = None
        cdef dict reasons = {}
        cdef bint have_newest = False
        cdef long long newest_s = 0
        cdef long long newest_ns = 0
        # the file records of the current run, turned into tuples in name order when the
        # run ends: objects made in the order they are later read lie in that order in memory
        cdef NameRef *pending = NULL
        cdef Py_ssize_t n_pending = 0
        cdef Py_ssize_t cap_pending = 0
        try:
            for k in range(self.c.n_records):
                rec = &self.c.records[k]
                if rec.kind == K_CONTENT:
                    if last_file == NULL:  # the collector records contents after their file
                        continue
                    path_in_run = PyUnicode_DecodeFSDefaultAndSize(
                        self.c.text + last_file.offset, last_file.length
                    )
                    if prefix is None:
                        prefix = _run_prefix(project, experiment, run_id)
                    contents[prefix + path_in_run] = \
                        PyBytes_FromStringAndSize(self.c.text + rec.offset, rec.length)
                    continue
                if rec.kind == K_FILE:
                    last_file = rec
                    if not have_newest or rec.mtime_s > newest_s or (
                            rec.mtime_s == newest_s and rec.mtime_ns > newest_ns):
                        have_newest = True
                        newest_s = rec.mtime_s
                        newest_ns = rec.mtime_ns
                    if not _grow(<void **>&pending, &cap_pending, n_pending + 1, sizeof(NameRef)):
                        raise MemoryError("out of memory while scanning " + repr(self.name))
                    pending[n_pending].text = self.c.text + rec.offset
                    pending[n_pending].length = rec.length
                    pending[n_pending].rec = rec
                    n_pending += 1
                    continue
                text = PyUnicode_DecodeFSDefaultAndSize(self.c.text + rec.offset, rec.length)
                if rec.kind == K_RUN:
                    _emit_files(files, pending, n_pending)
                    n_pending = 0
                    run_id = text
                    prefix = None
                    files = []
                    runs.append((project, experiment, text, files))
                elif rec.kind == K_EXPERIMENT:
                    experiment = text
                else:
                    reason = reasons.get(rec.code)
                    if reason is None:
                        reason = reasons[rec.code] = _reason(rec.code)
                    problems.append((text, reason))
            _emit_files(files, pending, n_pending)
        finally:
            free(pending)
        return runs, problems, contents, _ns(newest_s, newest_ns) if have_newest else None


cdef inline object _ns(long long seconds, long long nanoseconds):
    if -9000000000 < seconds < 9000000000:
        return seconds * 1000000000 + nanoseconds
    return <object>seconds * 1000000000 + nanoseconds


cdef object _reason(int code):
    if code == R_SYMLINK:
        return REASON_SYMLINK
    if code == R_NOT_A_DIRECTORY:
        return REASON_NOT_A_DIRECTORY
    if code == R_NOT_REGULAR:
        return REASON_NOT_REGULAR
    if code == R_VANISHED:
        return REASON_VANISHED
    if code == R_TOO_DEEP:
        return _names.REASON_TOO_DEEP
    if code == R_PATH_TOO_LONG:
        return _names.REASON_PATH_TOO_LONG
    if code <= R_NAME:
        return _names.NAME_REASONS[R_NAME - code]
    return reason_unreadable(OSError(code, os.strerror(code)))


cdef tuple _scan_one(_Project project, int root_fd, bytes runs_name):
    return project.scan(root_fd, runs_name)


def _read_names_blob(read) -> bytes | None:
    """The spec's checked names as the C walk wants them (see ``Collector.read_names``); a
    name the file system cannot encode matches no entry, as in the pure module. So does the
    empty name, which is left out: in the blob it would read as the end of the list."""
    encoded = []
    for name in sorted(_pure._read_names(read)):
        if not name:
            continue
        try:
            encoded.append(os.fsencode(name) + b"\0")
        except UnicodeEncodeError:
            continue
    return b"".join(encoded) + b"\0" if encoded else None


def scan_experiments(root: str, threads: int = 1, read: Collection[str] = ()) -> ScanResult:
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    read_names = _read_names_blob(read)
    try:
        path = os.fspath(root)
    except TypeError:
        path = None
    if type(path) is not str or "\0" in path:
        return _pure.scan_experiments(root, threads, read)
    cdef bytes root_bytes = os.fsencode(path)
    cdef const char *c_root = root_bytes
    cdef bytes runs_name = os.fsencode(RUNS_DIRNAME)
    cdef int fd
    cdef int error = 0
    cdef Listing listing
    cdef Py_ssize_t k
    cdef const char *entry
    cdef int kind
    cdef list problems = []
    cdef list projects = []
    cdef _Project project
    with nogil:
        while True:
            fd = openat(AT_FDCWD, c_root, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if fd >= 0 or errno != EINTR:
                break
        if fd < 0:
            error = errno
        else:
            error = _read_listing(fd, &listing)
            if error != 0:
                _free_listing(&listing)
                close(fd)
    if error == -1:
        raise MemoryError("out of memory while listing " + repr(path))
    if error != 0:
        raise OSError(error, os.strerror(error), root)
    try:
        for k in range(listing.count):
            entry = listing.names + listing.offsets[k]
            if entry[0] == b'.':
                continue
            name = PyUnicode_DecodeFSDefaultAndSize(entry, strlen(entry))
            with nogil:
                kind = _kind_of(fd, entry, listing.types[k])
            if kind == DT_LNK:
                problems.append((name, REASON_SYMLINK))
            elif kind == DT_DIR and _names.name_problem(name, top=True) is not None:
                problems.append((name, _names.name_problem(name, top=True)))
            elif kind == DT_DIR and name == RUNS_DIRNAME:
                # the runs-path layout: each directory of runs/ a unit, listed here as the
                # specification lists it (one directory, by its own helpers)
                listed = _pure._list_dir(os.path.join(path, RUNS_DIRNAME), RUNS_DIRNAME, problems)
                for child, _, _ in _pure._subdirs_of(listed, RUNS_DIRNAME, problems, False):
                    project = _Project()
                    project.name_bytes = os.fsencode(RUNS_DIRNAME + "/" + child)
                    project.name = RUNS_DIRNAME
                    project.read_names = read_names
                    project.run_path_unit = True
                    projects.append(project)
            elif kind == DT_DIR:
                project = _Project()
                project.name_bytes = <bytes>entry
                project.name = name
                project.read_names = read_names
                projects.append(project)
        if threads == 1 or len(projects) < 2:
            parts = [_scan_one(p, fd, runs_name) for p in projects]
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                parts = list(pool.map(lambda p: _scan_one(p, fd, runs_name), projects))
    finally:
        _free_listing(&listing)
        close(fd)
    cdef list runs = []
    cdef dict contents = {}
    newest = None
    for project_runs, project_problems, project_contents, project_newest in parts:
        runs.extend(project_runs)
        problems.extend(project_problems)
        contents.update(project_contents)
        if project_newest is not None and (newest is None or project_newest > newest):
            newest = project_newest
    runs.sort()  # (project, name, run_id) is unique: the file lists are never compared
    return _pure._finish(runs, problems, contents, newest)


scan_experiments.__doc__ = _pure.scan_experiments.__doc__
