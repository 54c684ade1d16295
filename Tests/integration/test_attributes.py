"""Attributes: chmod, chown, utimensat (ns times, UTIME_NOW, UTIME_OMIT), c/mtime updates,
extended attributes and statfs."""

from __future__ import annotations

import errno
import os
import stat
import time


from posix_helpers import (NOW, OMIT, XATTR_CREATE, XATTR_REPLACE, assert_errno, getxattr_raw,
                           listxattr_raw, utimensat, write_file)

SECOND_NS = 1_000_000_000


# --------------------------------------------------------------------------- chmod / chown

def test_chmod_all_mode_bits(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    for mode in (0o000, 0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o7777, 0o600):
        os.chmod(p, mode)
        assert stat.S_IMODE(os.stat(p).st_mode) == mode, f"chmod {oct(mode)}"
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o640)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640
    finally:
        os.close(fd)
    os.mkdir(weft.path / "d")
    os.chmod(weft.path / "d", 0o3750)
    st = os.stat(weft.path / "d")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o3750
    # chmod through a symlink changes the target.
    os.symlink("f", weft.path / "s")
    os.chmod(weft.path / "s", 0o604)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o604
    assert_errno(errno.ENOENT, os.chmod, weft.path / "missing", 0o644)


def test_chown_as_root(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.chown(p, -1, 42)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 42)
    os.chown(p, 7, -1)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (7, 42)
    os.chown(p, 4_000_000_000, 4_000_000_001)     # full 32-bit ids
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (4_000_000_000, 4_000_000_001)
    # lchown changes the link itself, not its target.
    os.symlink("f", weft.path / "s")
    os.lchown(weft.path / "s", 99, 98)
    assert (os.lstat(weft.path / "s").st_uid, os.lstat(weft.path / "s").st_gid) == (99, 98)
    assert os.stat(p).st_uid == 4_000_000_000


def test_chmod_and_chown_update_ctime_not_mtime(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    utimensat(p, 1_000_000_000 * SECOND_NS, 1_000_000_000 * SECOND_NS)
    before = os.stat(p)
    time.sleep(0.02)
    os.chmod(p, 0o600)
    os.chown(p, 10, 10)
    after = os.stat(p)
    assert after.st_mtime_ns == before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns
    assert abs(after.st_ctime_ns - time.time_ns()) < 60 * SECOND_NS


# --------------------------------------------------------------------------- times

def test_utimensat_explicit_nanoseconds(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    atime = 1_234_567_890 * SECOND_NS + 123_456_789
    mtime = 1_500_000_000 * SECOND_NS + 987_654_321
    utimensat(p, atime, mtime)
    st = os.stat(p)
    assert st.st_atime_ns == atime, "atime is not kept to the nanosecond"
    assert st.st_mtime_ns == mtime, "mtime is not kept to the nanosecond"
    # os.utime with ns= goes through the same call; and a directory.
    os.mkdir(weft.path / "d")
    os.utime(weft.path / "d", ns=(5 * SECOND_NS + 1, 6 * SECOND_NS + 2))
    st = os.stat(weft.path / "d")
    assert (st.st_atime_ns, st.st_mtime_ns) == (5 * SECOND_NS + 1, 6 * SECOND_NS + 2)
    # futimens through an fd.
    fd = os.open(p, os.O_RDONLY)
    try:
        os.utime(fd, ns=(7 * SECOND_NS + 3, 8 * SECOND_NS + 4))
        st = os.fstat(fd)
        assert (st.st_atime_ns, st.st_mtime_ns) == (7 * SECOND_NS + 3, 8 * SECOND_NS + 4)
    finally:
        os.close(fd)


def test_utimensat_now_and_omit(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    old = 1_000_000_000 * SECOND_NS + 5
    utimensat(p, old, old)
    utimensat(p, OMIT, NOW)                 # only mtime to now
    st = os.stat(p)
    assert st.st_atime_ns == old, "UTIME_OMIT changed atime"
    assert abs(st.st_mtime_ns - time.time_ns()) < 60 * SECOND_NS, "UTIME_NOW did not set mtime to now"
    mtime_now = st.st_mtime_ns
    utimensat(p, NOW, OMIT)                 # only atime to now
    st = os.stat(p)
    assert abs(st.st_atime_ns - time.time_ns()) < 60 * SECOND_NS, "UTIME_NOW did not set atime to now"
    assert st.st_mtime_ns == mtime_now, "UTIME_OMIT changed mtime"
    explicit = 1_111_111_111 * SECOND_NS + 111
    utimensat(p, OMIT, explicit)
    st = os.stat(p)
    assert st.st_mtime_ns == explicit
    before_ctime = st.st_ctime_ns
    utimensat(p, OMIT, OMIT)                # no change at all
    st = os.stat(p)
    assert st.st_mtime_ns == explicit
    assert st.st_ctime_ns >= before_ctime


def test_utimensat_on_symlink_itself(weft):
    write_file(weft.path / "f", b"x")
    os.symlink("f", weft.path / "s")
    target_mtime = os.stat(weft.path / "f").st_mtime_ns
    when = 1_300_000_000 * SECOND_NS + 77
    utimensat(weft.path / "s", when, when, follow_symlinks=False)
    assert os.lstat(weft.path / "s").st_mtime_ns == when
    assert os.stat(weft.path / "f").st_mtime_ns == target_mtime


def test_times_before_epoch_and_after_2038(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    before_epoch = -86_400 * SECOND_NS + 500           # 1969-12-31
    after_2038 = 4_102_444_800 * SECOND_NS + 1         # 2100-01-01
    utimensat(p, before_epoch, after_2038)
    st = os.stat(p)
    assert st.st_atime_ns == before_epoch
    assert st.st_mtime_ns == after_2038


def test_write_updates_mtime_and_ctime(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    past = 1_000_000_000 * SECOND_NS
    utimensat(p, past, past)
    fd = os.open(p, os.O_WRONLY)
    try:
        os.write(fd, b"more")
    finally:
        os.close(fd)
    st = os.stat(p)
    assert abs(st.st_mtime_ns - time.time_ns()) < 60 * SECOND_NS, "write did not update mtime"
    assert abs(st.st_ctime_ns - time.time_ns()) < 60 * SECOND_NS, "write did not update ctime"
    utimensat(p, past, past)
    os.truncate(p, 1)
    assert abs(os.stat(p).st_mtime_ns - time.time_ns()) < 60 * SECOND_NS, \
        "truncate did not update mtime"


def test_directory_mtime_changes_with_entries(weft):
    d = weft.path / "d"
    os.mkdir(d)
    past = 1_000_000_000 * SECOND_NS
    for action in (lambda: write_file(d / "f", b""), lambda: os.rename(d / "f", d / "g"),
                   lambda: os.mkdir(d / "sub"), lambda: os.unlink(d / "g"),
                   lambda: os.rmdir(d / "sub"), lambda: os.symlink("x", d / "s")):
        utimensat(d, past, past)
        action()
        st = os.stat(d)
        assert abs(st.st_mtime_ns - time.time_ns()) < 60 * SECOND_NS, \
            "directory mtime not updated by a change of its entries"


# --------------------------------------------------------------------------- xattrs

def test_xattr_set_get_list_remove(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    os.setxattr(p, "user.alpha", b"one")
    os.setxattr(p, "user.beta", b"\x00binary\xff\x00")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.alpha") == b"one"
    assert os.getxattr(p, "user.beta") == b"\x00binary\xff\x00"
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(os.listxattr(p)) == ["user.alpha", "user.beta", "user.empty"]
    os.setxattr(p, "user.alpha", b"replaced, longer value")
    assert os.getxattr(p, "user.alpha") == b"replaced, longer value"
    os.removexattr(p, "user.alpha")
    assert_errno(errno.ENODATA, os.getxattr, p, "user.alpha")
    assert sorted(os.listxattr(p)) == ["user.beta", "user.empty"]
    # On a directory too.
    os.mkdir(weft.path / "d")
    os.setxattr(weft.path / "d", "user.dir", b"on a dir")
    assert os.getxattr(weft.path / "d", "user.dir") == b"on a dir"
    assert os.listxattr(weft.path / "d") == ["user.dir"]


def test_xattr_flags_and_errors(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    os.setxattr(p, "user.k", b"v", XATTR_CREATE)
    assert_errno(errno.EEXIST, os.setxattr, p, "user.k", b"w", XATTR_CREATE)
    assert os.getxattr(p, "user.k") == b"v"
    assert_errno(errno.ENODATA, os.setxattr, p, "user.missing", b"w", XATTR_REPLACE)
    os.setxattr(p, "user.k", b"w", XATTR_REPLACE)
    assert os.getxattr(p, "user.k") == b"w"
    assert_errno(errno.ENODATA, os.getxattr, p, "user.missing")
    assert_errno(errno.ENODATA, os.removexattr, p, "user.missing")
    assert_errno(errno.ENOENT, os.getxattr, weft.path / "nofile", "user.k")


def test_xattr_buffer_sizes(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    value = b"0123456789" * 10
    os.setxattr(p, "user.big", value)
    os.setxattr(p, "user.b2", b"v")
    assert getxattr_raw(p, "user.big", 0) == len(value)          # size query
    assert getxattr_raw(p, "user.big", len(value)) == len(value)
    assert_errno(errno.ERANGE, getxattr_raw, p, "user.big", 10)
    listing = len(b"user.big\x00user.b2\x00")
    assert listxattr_raw(p, 0) == listing
    assert listxattr_raw(p, listing) == listing
    assert_errno(errno.ERANGE, listxattr_raw, p, 3)


def test_xattr_limits(weft):
    p = weft.path / "f"
    write_file(p, b"x")
    # Weft stores values up to the Linux maximum (64 KiB); ext4 (localdir self-check) only
    # what fits in one block.
    max_value = os.urandom(65536 if weft.is_weft else 2000)
    os.setxattr(p, "user.max", max_value)
    assert os.getxattr(p, "user.max") == max_value
    assert_errno(errno.E2BIG, os.setxattr, p, "user.over", b"x" * 65537)
    name255 = "user." + "n" * 250
    os.setxattr(p, name255, b"long name")
    assert os.getxattr(p, name255) == b"long name"
    assert_errno(errno.ERANGE, os.setxattr, p, name255 + "n", b"x")


# --------------------------------------------------------------------------- statfs

def test_statvfs(weft):
    sv = os.statvfs(weft.path)
    assert sv.f_namemax == 255
    assert sv.f_bsize > 0 and sv.f_frsize > 0
    assert sv.f_blocks > 0, "statfs reports a volume of zero blocks"
    assert 0 <= sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    assert 0 <= sv.f_ffree <= sv.f_files or sv.f_files == 0
    # The same answer through an fd and from a subdirectory.
    os.mkdir(weft.path / "d")
    assert os.statvfs(weft.path / "d").f_namemax == 255
    fd = os.open(weft.path, os.O_RDONLY)
    try:
        assert os.fstatvfs(fd).f_namemax == 255
    finally:
        os.close(fd)
