"""SFTP version 3 on the wire: packet types, status codes, attributes, and the decoding of
one packet body. Written from draft-ietf-secsh-filexfer-02.

Nothing here sends or receives: :mod:`.sftp_ops` builds requests with these encoders and
:mod:`.sftp_pipeline` moves the bytes. A malformed answer raises :class:`SftpProtocolError`
(a ``ConnectionError``: the channel cannot be trusted after it), never an ``IndexError``.
"""

from __future__ import annotations

import errno
import stat
import struct
from dataclasses import dataclass

__all__ = [
    "HEADER",
    "INIT_PACKET",
    "MAX_PACKET",
    "SFTP_VERSION",
    "U32",
    "U64",
    "Attrs",
    "Reader",
    "SftpProtocolError",
    "encode_path",
    "encode_string",
    "expect_answer",
    "status_error",
]

# Refuse absurd packets from a broken or hostile server instead of allocating for them.
MAX_PACKET = 4 * 1024 * 1024
SFTP_VERSION = 3

# Packet types (draft-ietf-secsh-filexfer-02, section 3).
FXP_INIT = 1
FXP_VERSION = 2
FXP_OPEN = 3
FXP_CLOSE = 4
FXP_READ = 5
FXP_LSTAT = 7
FXP_FSTAT = 8
FXP_OPENDIR = 11
FXP_READDIR = 12
FXP_REALPATH = 16
FXP_STAT = 17
FXP_STATUS = 101
FXP_HANDLE = 102
FXP_DATA = 103
FXP_NAME = 104
FXP_ATTRS = 105

FXF_READ = 0x00000001

FX_OK = 0
FX_EOF = 1
FX_NO_SUCH_FILE = 2
FX_PERMISSION_DENIED = 3
FX_FAILURE = 4
FX_BAD_MESSAGE = 5
FX_NO_CONNECTION = 6
FX_CONNECTION_LOST = 7
FX_OP_UNSUPPORTED = 8

ATTR_SIZE = 0x00000001
ATTR_UIDGID = 0x00000002
ATTR_PERMISSIONS = 0x00000004
ATTR_ACMODTIME = 0x00000008
ATTR_EXTENDED = 0x80000000

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
HEADER = struct.Struct(">IBI")  # length, type, request id
INIT_PACKET = U32.pack(5) + bytes([FXP_INIT]) + U32.pack(SFTP_VERSION)


class SftpProtocolError(ConnectionError):
    """The server broke the SFTP protocol; the channel cannot be trusted any more."""


@dataclass(frozen=True)
class Attrs:
    """The file attributes an SFTP v3 server reports (fields it left out are None)."""

    size: int | None = None
    uid: int | None = None
    gid: int | None = None
    permissions: int | None = None
    atime: int | None = None
    mtime: int | None = None

    @property
    def is_dir(self) -> bool:
        return self.permissions is not None and stat.S_ISDIR(self.permissions)

    @property
    def is_symlink(self) -> bool:
        return self.permissions is not None and stat.S_ISLNK(self.permissions)

    @property
    def is_regular(self) -> bool:
        return self.permissions is not None and stat.S_ISREG(self.permissions)


# -- encoding ----------------------------------------------------------------------------------


def encode_string(data: bytes) -> bytes:
    return U32.pack(len(data)) + data


def encode_path(path: str) -> bytes:
    # surrogateescape: a name the server gave us as undecodable bytes goes back unchanged.
    return encode_string(path.encode("utf-8", "surrogateescape"))


class Reader:
    """Cursor over one packet body; a short body raises SftpProtocolError, never IndexError."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0

    def u32(self) -> int:
        end = self._pos + 4
        if end > len(self._data):
            raise SftpProtocolError("truncated SFTP packet from the server")
        (value,) = U32.unpack_from(self._data, self._pos)
        self._pos = end
        return int(value)

    def u64(self) -> int:
        end = self._pos + 8
        if end > len(self._data):
            raise SftpProtocolError("truncated SFTP packet from the server")
        (value,) = U64.unpack_from(self._data, self._pos)
        self._pos = end
        return int(value)

    def string(self) -> bytes:
        size = self.u32()
        end = self._pos + size
        if end > len(self._data):
            raise SftpProtocolError("truncated SFTP packet from the server")
        value = bytes(self._data[self._pos : end])
        self._pos = end
        return value

    def text(self) -> str:
        return self.string().decode("utf-8", "surrogateescape")

    def attrs(self) -> Attrs:
        flags = self.u32()
        size = self.u64() if flags & ATTR_SIZE else None
        uid = gid = None
        if flags & ATTR_UIDGID:
            uid, gid = self.u32(), self.u32()
        permissions = self.u32() if flags & ATTR_PERMISSIONS else None
        atime = mtime = None
        if flags & ATTR_ACMODTIME:
            atime, mtime = self.u32(), self.u32()
        if flags & ATTR_EXTENDED:
            for _ in range(self.u32()):
                self.string()
                self.string()
        return Attrs(size, uid, gid, permissions, atime, mtime)


def status_error(code: int, message: str, path: str) -> BaseException:
    """The Python exception for an SFTP STATUS ``code`` about ``path`` (EOFError for EOF)."""
    detail = f"{message} (SFTP status {code})" if message else f"SFTP status {code}"
    if code == FX_EOF:
        return EOFError(f"end of file: {path!r}")
    if code == FX_NO_SUCH_FILE:
        return FileNotFoundError(errno.ENOENT, detail, path)
    if code == FX_PERMISSION_DENIED:
        return PermissionError(errno.EACCES, detail, path)
    if code in (FX_NO_CONNECTION, FX_CONNECTION_LOST):
        return ConnectionError(f"{detail}: {path!r}")
    if code == FX_OP_UNSUPPORTED:
        return OSError(errno.EOPNOTSUPP, detail, path)
    return OSError(errno.EIO, detail, path)


def expect_answer(ptype: int, body: Reader, want: int, path: str) -> None:
    """Raise the STATUS error in an answer, or SftpProtocolError for an unexpected type."""
    if ptype == FXP_STATUS:
        code = body.u32()
        message = body.text() if code != FX_OK else ""
        raise status_error(code, message, path)
    if ptype != want:
        raise SftpProtocolError(f"unexpected SFTP answer type {ptype} (wanted {want}) for {path!r}")
