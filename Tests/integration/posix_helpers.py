"""System-call helpers the os module lacks, errno assertions, and running code as another user."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import select
import signal
import stat
import time
import traceback
from typing import Callable, Iterable, Optional, Union

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
XATTR_CREATE = 1
XATTR_REPLACE = 2

MiB = 1024 * 1024
GiB = 1024 * MiB


def ename(code: Optional[int]) -> str:
    if code is None or code == 0:
        return "OK"
    return errno.errorcode.get(code, str(code))


def _raise_errno(*names) -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code), *names)


# --------------------------------------------------------------------------- syscalls

_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def renameat2(old: Union[str, bytes, os.PathLike], new: Union[str, bytes, os.PathLike],
              flags: int = 0) -> None:
    """renameat2(2) with RENAME_NOREPLACE / RENAME_EXCHANGE."""
    r = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if r != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fsdecode(old), None, os.fsdecode(new))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.utimensat.restype = ctypes.c_int

NOW = "UTIME_NOW"
OMIT = "UTIME_OMIT"


def _timespec(value) -> _Timespec:
    if value == NOW:
        return _Timespec(0, UTIME_NOW)
    if value == OMIT:
        return _Timespec(0, UTIME_OMIT)
    sec, nsec = divmod(int(value), 1_000_000_000)
    return _Timespec(sec, nsec)


def utimensat(path, atime_ns, mtime_ns, follow_symlinks: bool = True) -> None:
    """utimensat(2); each time is an int of nanoseconds since the epoch, NOW or OMIT."""
    times = (_Timespec * 2)(_timespec(atime_ns), _timespec(mtime_ns))
    flags = 0 if follow_symlinks else AT_SYMLINK_NOFOLLOW
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, flags) != 0:
        _raise_errno(os.fsdecode(path))


_libc.getxattr.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.getxattr.restype = ctypes.c_ssize_t
_libc.listxattr.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.listxattr.restype = ctypes.c_ssize_t


def getxattr_raw(path, name: str, size: int) -> int:
    """getxattr(2) with an explicit buffer size (0 = size query); returns the length."""
    buf = ctypes.create_string_buffer(max(size, 1))
    r = _libc.getxattr(os.fsencode(path), name.encode(), buf if size else None, size)
    if r < 0:
        _raise_errno(os.fsdecode(path))
    return r


def listxattr_raw(path, size: int) -> int:
    """listxattr(2) with an explicit buffer size (0 = size query); returns the length."""
    buf = ctypes.create_string_buffer(max(size, 1))
    r = _libc.listxattr(os.fsencode(path), buf if size else None, size)
    if r < 0:
        _raise_errno(os.fsdecode(path))
    return r


# --------------------------------------------------------------------------- errno assertions

def _describe_call(fn: Callable, args, kwargs) -> str:
    name = getattr(fn, "__name__", repr(fn))
    shown = [repr(os.fsdecode(a)) if isinstance(a, (bytes, os.PathLike)) else
             (f"{a!r}"[:80]) for a in args]
    shown += [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(shown)})"


def assert_errno(expected: Union[int, Iterable[int]], fn: Callable, *args, **kwargs) -> int:
    """Calls fn and asserts it raises OSError with one of the expected errnos."""
    wanted = {expected} if isinstance(expected, int) else set(expected)
    try:
        result = fn(*args, **kwargs)
    except OSError as e:
        if e.errno not in wanted:
            raise AssertionError(f"{_describe_call(fn, args, kwargs)}: expected "
                                 f"{'/'.join(sorted(ename(w) for w in wanted))}, got "
                                 f"{ename(e.errno)} ({e})") from None
        return e.errno
    if isinstance(result, int) and fn is os.open:
        os.close(result)
    raise AssertionError(f"{_describe_call(fn, args, kwargs)}: expected "
                         f"{'/'.join(sorted(ename(w) for w in wanted))}, but it succeeded "
                         f"(returned {result!r})")


def outcome(fn: Callable, *args, **kwargs) -> str:
    """'OK' or the errno name of fn(*args); an fd returned by os.open is closed."""
    try:
        result = fn(*args, **kwargs)
    except OSError as e:
        return ename(e.errno)
    if fn is os.open and isinstance(result, int):
        os.close(result)
    return "OK"


# --------------------------------------------------------------------------- data helpers

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, block_bytes: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            block = os.read(fd, block_bytes)
            if not block:
                break
            h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def read_file(path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            block = os.read(fd, 4 * MiB)
            if not block:
                return b"".join(chunks)
            chunks.append(block)
    finally:
        os.close(fd)


def write_file(path, data: bytes, mode: int = 0o644, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        assert n > 0, "write returned 0"
        view = view[n:]


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        assert n > 0, "pwrite returned 0"
        view = view[n:]
        offset += n


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """pread until `size` bytes or end of file."""
    parts = []
    while size > 0:
        block = os.pread(fd, size, offset)
        if not block:
            break
        parts.append(block)
        size -= len(block)
        offset += len(block)
    return b"".join(parts)


def first_difference(a: bytes, b: bytes) -> Optional[int]:
    n = min(len(a), len(b))
    for start in range(0, n, 65536):
        if a[start:start + 65536] != b[start:start + 65536]:
            for i in range(start, min(n, start + 65536)):
                if a[i] != b[i]:
                    return i
    return None if len(a) == len(b) else n


def assert_same_bytes(got: bytes, expected: bytes, what: str) -> None:
    if got == expected:
        return
    i = first_difference(got, expected)
    raise AssertionError(f"{what}: {len(got)} bytes read, {len(expected)} expected; first "
                         f"difference at offset {i}: got {got[i:i + 16]!r}, expected "
                         f"{expected[i:i + 16]!r}")


def file_type(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "chardev"), (stat.S_ISBLK, "blockdev")):
        if test(mode):
            return name
    return "unknown"


# --------------------------------------------------------------------------- other users

def run_as(uid: int, gid: int, groups: Iterable[int], fn: Callable, *args,
           timeout_s: float = 120.0):
    """Forks a child that drops to uid/gid/groups, runs fn(*args) and sends back its
    JSON-serializable result through a pipe. An exception in the child fails the caller."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.umask(0o022)
            payload = {"ok": fn(*args)}
        except BaseException:
            payload = {"error": traceback.format_exc()}
            code = 1
        try:
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(write_end, data):]
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"child running as uid {uid} did not finish within "
                                     f"{timeout_s}s (hung system call?)")
            ready, _, _ = select.select([read_end], [], [], min(remaining, 1.0))
            if ready:
                block = os.read(read_end, 65536)
                if not block:
                    break
                chunks.append(block)
    finally:
        os.close(read_end)
    os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError(f"child running as uid {uid} sent nothing back")
    payload = json.loads(b"".join(chunks))
    if "error" in payload:
        raise AssertionError(f"child running as uid {uid} gid {gid} groups {list(groups)} "
                             f"raised:\n{payload['error']}")
    return payload["ok"]
