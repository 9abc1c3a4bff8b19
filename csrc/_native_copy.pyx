# cython: language_level=3, binding=True, annotation_typing=False
"""Compiled twin of :mod:`runicorn.core.copy`: the per-file loop of a cold sync from a
local-directory remote, in C, with the GIL released and the files shared out over threads.

Why this module exists: a cold sync of a lab of small files is a few system calls per file
(open the source beneath its root, read it, create a temp file, write it, set its mtime,
rename it). From Python each of those is a call with its argument conversions, an exception
path and a reference count or two, several times the cost of the system call itself, and
all of it under the GIL, so one core does everything. Here a batch of jobs is converted
once, copied by ``threads`` threads that hold no GIL, and turned into results once.

Why it is a twin: :mod:`runicorn.core.copy` is the specification. The outcome constants,
temp names and error numbers are its own; each path is opened beneath its root exactly as
:func:`runicorn._sys.beneath.open_beneath` does (``openat2`` with ``RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS``, or one ``O_NOFOLLOW`` component at a time where the kernel refuses
it), so a symbolic link anywhere on either path fails the job with ``ELOOP`` in both.
"""

import threading

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp
from posix.unistd cimport close

from runicorn.core import copy as _pure
from runicorn.core.copy import (
    COPIED,
    DIR_MODE,
    HELD,
    INSTALL_FAILED,
    READ_SIZE,
    SHRUNK,
    SOURCE_FAILED,
    TARGET_FAILED,
    TEMP_ATTEMPTS,
    CopyJob,
    CopyResult,
    Install,
    temp_name,
)

__all__ = ["COPIED", "DIR_MODE", "HELD", "INSTALL_FAILED", "READ_SIZE", "SHRUNK", "SOURCE_FAILED",
           "TARGET_FAILED", "TEMP_ATTEMPTS", "CopyJob", "CopyResult", "Install", "copy_files",
           "install_files", "temp_name"]

cdef extern from "Python.h":
    bytes PyUnicode_EncodeFSDefault(object unicode)

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/stat.h>
    #include <unistd.h>
    #if defined(__linux__)
    #include <sys/syscall.h>
    #endif

    #define __RC_TEMP_ATTEMPTS 8
    #define __RC_READ_SIZE (1LL << 20)
    #define __RC_DIR_MODE 0755

    /* Outcomes: the values of runicorn.core.copy's constants (checked at import). */
    enum { RC_COPIED = 0, RC_HELD = 1, RC_SOURCE = 2, RC_SHRUNK = 3, RC_TARGET = 4,
           RC_INSTALL = 5 };

    struct rc_job {
        const char *path;       /* below both roots, '/'-separated */
        long long path_length;
        long long length;
        long long mtime_ns;
        int hold;
        /* results */
        int outcome;
        int error;
        int attempt;            /* of the temp name that was created */
        long long received;
        char *data;             /* a held job's bytes (malloc) */
    };

    struct rc_install {
        const char *path;
        long long path_length;
        const char *temp;
        int keep;
        int error;              /* result */
    };

    struct rc_how { unsigned long long flags, mode, resolve; };

    /* 1 while openat2 may work, 0 once the kernel (or a sandbox) refused it. */
    static volatile int rc_openat2_usable = 1;

    static int rc_is_link(int dir_fd, const char *name) {
        struct stat st;
        return fstatat(dir_fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode);
    }

    /* open_beneath's chain: each directory relative to the last, then the last part.
       parts is a NUL-separated list of count components. */
    static int rc_open_chain(int dir_fd, const char *parts, int count, int flags) {
        int current = dir_fd, step, saved;
        const char *part = parts;
        for (int i = 0; i < count - 1; i++) {
            step = openat(current, part, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (step < 0) {
                saved = errno;
                if ((saved == ELOOP || saved == ENOTDIR) && rc_is_link(current, part))
                    saved = ELOOP;
                if (current != dir_fd) close(current);
                errno = saved;
                return -1;
            }
            if (current != dir_fd) close(current);
            current = step;
            part += strlen(part) + 1;
        }
        step = openat(current, part, flags, 0);
        if (step < 0) {
            saved = errno;
            if (saved == ELOOP || (saved == ENOTDIR && rc_is_link(current, part)))
                saved = ELOOP;
            if (current != dir_fd) close(current);
            errno = saved;
            return -1;
        }
        if (current != dir_fd) close(current);
        return step;
    }

    /* open_beneath: path (length bytes, no NUL) below dir_fd, no symbolic link followed
       anywhere; "" and "." components are skipped, ".." is refused (ELOOP). */
    static int rc_open_beneath(int dir_fd, const char *path, long long length, int flags) {
        char joined_small[256], parts_small[256];
        char *joined = length < 255 ? joined_small : malloc((size_t)length + 1);
        char *parts = length < 254 ? parts_small : malloc((size_t)length + 2);
        long long j = 0, p = 0, start = 0;
        int count = 0, fd = -1, saved = 0;
        if (joined == NULL || parts == NULL) { saved = ENOMEM; goto done; }
        flags |= O_NOFOLLOW | O_CLOEXEC;
        for (long long i = 0; i <= length; i++) {
            if (i == length || path[i] == '/') {
                long long n = i - start;
                if (!(n == 0 || (n == 1 && path[start] == '.'))) {
                    if (n == 2 && path[start] == '.' && path[start + 1] == '.') {
                        saved = ELOOP;
                        goto done;
                    }
                    if (count) joined[j++] = '/';
                    memcpy(joined + j, path + start, n);
                    j += n;
                    memcpy(parts + p, path + start, n);
                    p += n;
                    parts[p++] = 0;
                    count++;
                }
                start = i + 1;
            }
        }
        joined[j] = 0;
        if (!count) {
            fd = openat(dir_fd, ".", flags & ~O_NOFOLLOW);
            if (fd < 0) saved = errno;
            goto done;
        }
    #if defined(__linux__) && defined(SYS_openat2)
        if (rc_openat2_usable) {
            struct rc_how how = {(unsigned long long)flags, 0, 0x08 | 0x04 | 0x02};
            fd = (int)syscall(SYS_openat2, dir_fd, joined, &how, sizeof(how));
            if (fd >= 0) goto done;
            saved = errno;
            if (saved == ENOSYS || saved == EPERM) {
                rc_openat2_usable = 0;
            } else if (saved == ELOOP || saved == EXDEV) {
                saved = ELOOP;
                goto done;
            } else if (saved != EAGAIN && saved != ENOTDIR) {
                goto done;
            }
            saved = 0;
        }
    #endif
        fd = rc_open_chain(dir_fd, parts, count, flags);
        if (fd < 0) saved = errno;
    done:
        if (joined != joined_small && joined != NULL) free(joined);
        if (parts != parts_small && parts != NULL) free(parts);
        errno = saved;
        return fd;
    }

    /* The directory part of path (possibly empty) opened beneath target_fd. */
    static int rc_open_directory(int target_fd, const char *path, long long length) {
        long long cut = length;
        while (cut > 0 && path[cut - 1] != '/') cut--;
        return rc_open_beneath(target_fd, path, cut > 0 ? cut - 1 : 0, O_RDONLY | O_DIRECTORY);
    }

    /* The directory ``name`` in ``parent``, made first when missing; never a link. */
    static int rc_child(int parent, const char *name) {
        int flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, fd, saved;
        fd = openat(parent, name, flags);
        if (fd < 0 && errno == ENOENT) {
            if (mkdirat(parent, name, __RC_DIR_MODE) != 0 && errno != EEXIST) return -1;
            fd = openat(parent, name, flags);
        }
        if (fd < 0) {
            saved = errno;
            if ((saved == ELOOP || saved == ENOTDIR) && rc_is_link(parent, name))
                saved = ELOOP;
            errno = saved;
        }
        return fd;
    }

    /* The directory part of path beneath target_fd, missing parts made one at a time. */
    static int rc_make_directory(int target_fd, const char *path, long long length) {
        long long end = length, start = 0;
        int current = target_fd, step, saved = 0;
        char small[256];
        char *name;
        while (end > 0 && path[end - 1] != '/') end--;
        end = end > 0 ? end - 1 : 0;
        name = end < 255 ? small : malloc((size_t)end + 1);
        if (name == NULL) { errno = ENOMEM; return -1; }
        for (long long i = 0; i <= end; i++) {
            if (i < end && path[i] != '/') continue;
            long long n = i - start;
            if (!(n == 0 || (n == 1 && path[start] == '.'))) {
                if (n == 2 && path[start] == '.' && path[start + 1] == '.') {
                    saved = ELOOP;
                    goto fail;
                }
                memcpy(name, path + start, n);
                name[n] = 0;
                step = rc_child(current, name);
                if (step < 0) { saved = errno; goto fail; }
                if (current != target_fd) close(current);
                current = step;
            }
            start = i + 1;
        }
        if (current == target_fd) {
            current = openat(target_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (current < 0) saved = errno;
        }
        if (name != small) free(name);
        errno = saved;
        return current;
    fail:
        if (current != target_fd) close(current);
        if (name != small) free(name);
        errno = saved;
        return -1;
    }

    static const char *rc_name(const char *path, long long length) {
        long long cut = length;
        while (cut > 0 && path[cut - 1] != '/') cut--;
        return path + cut;
    }

    static void rc_temp_name(char *out, size_t size, const char *prefix, long long index,
                             int attempt) {
        if (attempt)
            snprintf(out, size, "%s%llx-%d.part", prefix, (unsigned long long)index, attempt);
        else
            snprintf(out, size, "%s%llx.part", prefix, (unsigned long long)index);
    }

    static int rc_write_all(int fd, const char *data, long long length) {
        while (length > 0) {
            ssize_t n = write(fd, data, (size_t)length);
            if (n < 0) {
                if (errno == EINTR) continue;
                return -1;
            }
            data += n;
            length -= n;
        }
        return 0;
    }

    #define RC_FAIL(kind) do { job->outcome = (kind); job->error = errno ? errno : EIO; \\
                               goto fail; } while (0)

    /* dir_cache: the file's directory when a job before it in the same directory opened
       it (kept open for the next one; the caller closes it), else -1 and set here. */
    static void rc_copy_one(int source_fd, int target_fd, struct rc_job *job,
                            const char *prefix, long long index, char *buffer,
                            long long buffer_size, int make_dirs, int *dir_cache) {
        int source = -1, dir_fd = -1, temp_fd = -1, created = 0;
        size_t temp_size = strlen(prefix) + 48;
        char temp_small[256];
        char *temp = temp_size <= sizeof(temp_small) ? temp_small : malloc(temp_size);
        struct stat st;
        struct timespec times[2];
        long long want;
        ssize_t n;
        char *target;
        job->received = 0;
        job->data = NULL;
        job->error = 0;
        if (temp == NULL) { errno = ENOMEM; RC_FAIL(RC_TARGET); }
        source = rc_open_beneath(source_fd, job->path, job->path_length,
                                 O_RDONLY | O_NONBLOCK);
        if (source < 0) RC_FAIL(RC_SOURCE);
        if (fstat(source, &st) != 0) RC_FAIL(RC_SOURCE);
        if (!S_ISREG(st.st_mode)) {
            errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
            RC_FAIL(RC_SOURCE);
        }
        if (*dir_cache >= 0) {
            dir_fd = *dir_cache;
        } else {
            dir_fd = rc_open_directory(target_fd, job->path, job->path_length);
            if (dir_fd < 0 && errno == ENOENT && make_dirs)
                dir_fd = rc_make_directory(target_fd, job->path, job->path_length);
            if (dir_fd < 0) RC_FAIL(RC_TARGET);
            *dir_cache = dir_fd;
        }
        for (job->attempt = 0; job->attempt < __RC_TEMP_ATTEMPTS; job->attempt++) {
            rc_temp_name(temp, temp_size, prefix, index, job->attempt);
            temp_fd = openat(dir_fd, temp,
                             O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
            if (temp_fd >= 0 || errno != EEXIST) break;
        }
        if (temp_fd < 0) RC_FAIL(RC_TARGET);
        created = 1;
        if (job->hold && job->length > 0) {
            job->data = malloc((size_t)job->length);
            if (job->data == NULL) { errno = ENOMEM; RC_FAIL(RC_TARGET); }
        }
        while (job->received < job->length) {
            want = job->length - job->received;
            if (want > __RC_READ_SIZE) want = __RC_READ_SIZE;
            target = job->data != NULL ? job->data + job->received : buffer;
            if (job->data == NULL && want > buffer_size) want = buffer_size;
            n = pread(source, target, (size_t)want, job->received);
            if (n < 0) {
                if (errno == EINTR) continue;
                RC_FAIL(RC_SOURCE);
            }
            if (n == 0) { errno = 0; job->outcome = RC_SHRUNK; job->error = 0; goto fail_set; }
            job->received += n;
            if (rc_write_all(temp_fd, target, n) != 0) RC_FAIL(RC_TARGET);
        }
        times[0].tv_sec = job->mtime_ns / 1000000000LL;
        times[0].tv_nsec = job->mtime_ns % 1000000000LL;
        if (times[0].tv_nsec < 0) { times[0].tv_nsec += 1000000000LL; times[0].tv_sec -= 1; }
        times[1] = times[0];
        if (futimens(temp_fd, times) != 0) RC_FAIL(RC_INSTALL);
        n = close(temp_fd);
        temp_fd = -1;
        if (n != 0) RC_FAIL(RC_INSTALL);
        if (job->hold) {
            job->outcome = RC_HELD;
            goto done;
        }
        if (renameat(dir_fd, temp, dir_fd, rc_name(job->path, job->path_length)) != 0)
            RC_FAIL(RC_INSTALL);
        job->outcome = RC_COPIED;
        goto done;
    fail:
    fail_set:
        if (job->data != NULL) { free(job->data); job->data = NULL; }
        if (created) {
            if (temp_fd >= 0) { close(temp_fd); temp_fd = -1; }
            unlinkat(dir_fd, temp, 0);
        }
    done:
        if (temp_fd >= 0) close(temp_fd);
        if (source >= 0) close(source);
        if (temp != temp_small && temp != NULL) free(temp);
    }

    static void rc_install_one(int target_fd, struct rc_install *item) {
        int dir_fd = rc_open_directory(target_fd, item->path, item->path_length);
        item->error = 0;
        if (dir_fd < 0) { item->error = errno ? errno : EIO; return; }
        if (item->keep) {
            if (renameat(dir_fd, item->temp, dir_fd, rc_name(item->path, item->path_length))
                != 0) {
                item->error = errno ? errno : EIO;
                unlinkat(dir_fd, item->temp, 0);
            }
        } else if (unlinkat(dir_fd, item->temp, 0) != 0) {
            item->error = errno ? errno : EIO;
        }
        close(dir_fd);
    }

    static long long rc_next(long long *counter) {
        return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
    }
    """
    enum:
        RC_COPIED
        RC_HELD
        RC_SOURCE
        RC_SHRUNK
        RC_TARGET
        RC_INSTALL
    struct rc_job:
        const char *path
        long long path_length
        long long length
        long long mtime_ns
        int hold
        int outcome
        int error
        int attempt
        long long received
        char *data
    struct rc_install:
        const char *path
        long long path_length
        const char *temp
        int keep
        int error
    void rc_copy_one(int source_fd, int target_fd, rc_job *job, const char *prefix,
                     long long index, char *buffer, long long buffer_size,
                     int make_dirs, int *dir_cache) nogil
    void rc_install_one(int target_fd, rc_install *item) nogil
    long long rc_next(long long *counter) nogil

cdef extern from *:
    int RC_TEMP_ATTEMPTS "__RC_TEMP_ATTEMPTS"
    int RC_DIR_MODE "__RC_DIR_MODE"
    long long RC_READ_SIZE "__RC_READ_SIZE"

if (COPIED, HELD, SOURCE_FAILED, SHRUNK, TARGET_FAILED, INSTALL_FAILED) != (
    RC_COPIED, RC_HELD, RC_SOURCE, RC_SHRUNK, RC_TARGET, RC_INSTALL
) or (TEMP_ATTEMPTS, READ_SIZE, DIR_MODE) != (RC_TEMP_ATTEMPTS, RC_READ_SIZE, RC_DIR_MODE):
    raise ImportError("runicorn.core._native_copy was built against other constants; rebuild it")


cdef class _Copies:
    """One batch of copy jobs in C memory; :meth:`work` takes jobs until none is left."""

    cdef rc_job *jobs
    cdef rc_install *installs
    cdef long long count
    cdef long long next_job
    cdef long long *groups
    cdef long long group_count
    cdef int source_fd
    cdef int target_fd
    cdef int make_dirs
    cdef const char *prefix
    cdef object keep_alive

    def __cinit__(self):
        self.jobs = NULL
        self.installs = NULL
        self.groups = NULL
        self.group_count = 0
        self.count = 0
        self.next_job = 0
        self.make_dirs = 0

    def __dealloc__(self):
        cdef long long i
        if self.jobs != NULL:
            for i in range(self.count):
                if self.jobs[i].data != NULL:
                    free(self.jobs[i].data)
            free(self.jobs)
        if self.installs != NULL:
            free(self.installs)
        if self.groups != NULL:
            free(self.groups)

    def work(self):
        """Copy (or install) jobs until every one is taken (any thread, without the GIL).

        Copy jobs are taken a directory at a time (:attr:`groups`): the files of one
        directory are created by one thread, one after the other, through one descriptor
        of it, so two threads never wait for each other on a directory's lock."""
        cdef long long index, group
        cdef int dir_cache
        cdef char *buffer = NULL
        if self.jobs != NULL:
            buffer = <char *>malloc(<size_t>RC_READ_SIZE)
            if buffer == NULL:
                raise MemoryError("no memory for a copy buffer")
        try:
            with nogil:
                while True:
                    if self.jobs != NULL:
                        group = rc_next(&self.next_job)
                        if group >= self.group_count:
                            break
                        dir_cache = -1
                        for index in range(self.groups[group], self.groups[group + 1]):
                            rc_copy_one(self.source_fd, self.target_fd, &self.jobs[index],
                                        self.prefix, index, buffer, RC_READ_SIZE,
                                        self.make_dirs, &dir_cache)
                        if dir_cache >= 0:
                            close(dir_cache)
                    else:
                        index = rc_next(&self.next_job)
                        if index >= self.count:
                            break
                        rc_install_one(self.target_fd, &self.installs[index])
        finally:
            free(buffer)


cdef bytes _encoded(object path):
    if not isinstance(path, str):
        raise TypeError(f"a job's path must be a str, not {type(path).__name__}")
    cdef bytes raw = PyUnicode_EncodeFSDefault(path)
    if memchr(<const char *>raw, 0, len(raw)) != NULL:
        raise ValueError(f"embedded null byte in {path!r}")
    return raw


cdef void _run(_Copies batch, int threads) except *:
    """Run ``batch`` on this thread and ``threads - 1`` helpers."""
    helpers = [
        threading.Thread(target=batch.work, name=f"runicorn-copy-{number}", daemon=True)
        for number in range(
            1, min(threads, batch.group_count if batch.jobs != NULL else batch.count)
        )
    ]
    for helper in helpers:
        helper.start()
    try:
        batch.work()
    finally:
        for helper in helpers:
            helper.join()


def copy_files(
    source_fd: int,
    target_fd: int,
    jobs: Sequence[CopyJob],
    temp_prefix: str,
    threads: int = 1,
    make_dirs: bool = False,
) -> list[CopyResult]:
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    jobs = list(jobs)
    cdef _Copies batch = _Copies()
    cdef long long i, count = len(jobs)
    cdef rc_job *job
    cdef bytes prefix = _encoded(temp_prefix)
    keep = [prefix]
    batch.source_fd = source_fd
    batch.target_fd = target_fd
    batch.make_dirs = 1 if make_dirs else 0
    batch.prefix = prefix
    batch.jobs = <rc_job *>malloc(max(count, 1) * sizeof(rc_job))
    batch.groups = <long long *>malloc((count + 1) * sizeof(long long))
    if batch.jobs == NULL or batch.groups == NULL:
        raise MemoryError("no memory for the copy jobs")
    batch.count = 0
    batch.group_count = 0
    cdef long long cut, previous_cut = -2
    cdef const char *previous = NULL
    for i in range(count):
        path, length, mtime_ns, hold = jobs[i]
        raw = _encoded(path)
        keep.append(raw)
        # Consecutive jobs in one directory (the same path up to the last "/") are one group.
        cut = raw.rfind(b"/")
        if cut != previous_cut or (cut > 0 and memcmp(previous, <const char *>raw, cut) != 0):
            batch.groups[batch.group_count] = i
            batch.group_count += 1
        previous = raw
        previous_cut = cut
        job = &batch.jobs[i]
        job.path = raw
        job.path_length = len(raw)
        job.length = length
        job.mtime_ns = mtime_ns
        job.hold = 1 if hold else 0
        job.data = NULL
        batch.count = i + 1
    batch.groups[batch.group_count] = count
    batch.keep_alive = keep
    _run(batch, threads)
    results = []
    for i in range(count):
        job = &batch.jobs[i]
        if job.outcome == RC_HELD:
            data = (
                PyBytes_FromStringAndSize(job.data, job.received) if job.data != NULL else b""
            )
            free(job.data)
            job.data = NULL
            results.append(
                (RC_HELD, 0, job.received, temp_name(temp_prefix, i, job.attempt), data)
            )
        else:
            results.append((job.outcome, job.error, job.received, None, None))
    return results


def install_files(target_fd: int, installs: Sequence[Install], threads: int = 1) -> list[int]:
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    installs = list(installs)
    cdef _Copies batch = _Copies()
    cdef long long i, count = len(installs)
    cdef rc_install *item
    keep = []
    batch.target_fd = target_fd
    batch.installs = <rc_install *>malloc(max(count, 1) * sizeof(rc_install))
    if batch.installs == NULL:
        raise MemoryError("no memory for the installs")
    for i in range(count):
        path, temp, keep_it = installs[i]
        raw = _encoded(path)
        raw_temp = _encoded(temp)
        keep.append(raw)
        keep.append(raw_temp)
        item = &batch.installs[i]
        item.path = raw
        item.path_length = len(raw)
        item.temp = raw_temp
        item.keep = 1 if keep_it else 0
        item.error = 0
    batch.count = count
    batch.keep_alive = keep
    _run(batch, threads)
    return [batch.installs[i].error for i in range(count)]


copy_files.__doc__ = _pure.copy_files.__doc__
install_files.__doc__ = _pure.install_files.__doc__
