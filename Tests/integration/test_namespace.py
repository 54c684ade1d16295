"""Names: rename (incl. renameat2 flags), link, unlink, symlink, mkdir, rmdir, name limits, nlink."""

from __future__ import annotations

import errno
import os
import stat
import time

from posix_helpers import (RENAME_EXCHANGE, RENAME_NOREPLACE, assert_errno, outcome, read_file,
                           renameat2, run_as, write_file)


def nlink(path) -> int:
    return os.lstat(path).st_nlink


# --------------------------------------------------------------------------- rename

def test_rename_plain(weft):
    a, b = weft.path / "a", weft.path / "b"
    write_file(a, b"content")
    ino = os.stat(a).st_ino
    os.rename(a, b)
    assert_errno(errno.ENOENT, os.stat, a)
    assert os.stat(b).st_ino == ino
    assert read_file(b) == b"content"
    assert sorted(os.listdir(weft.path)) == ["b"]


def test_rename_across_directories_updates_parents(weft):
    root = weft.path
    os.makedirs(root / "src" / "moved" / "inner")
    os.mkdir(root / "dst")
    write_file(root / "src" / "moved" / "inner" / "f", b"deep")
    assert nlink(root / "src") == 3 and nlink(root / "dst") == 2
    os.rename(root / "src" / "moved", root / "dst" / "moved")
    assert nlink(root / "src") == 2, "source parent lost a subdirectory"
    assert nlink(root / "dst") == 3, "target parent gained a subdirectory"
    assert os.stat(root / "dst" / "moved" / "..").st_ino == os.stat(root / "dst").st_ino, \
        "'..' of a moved directory must be its new parent"
    assert read_file(root / "dst" / "moved" / "inner" / "f") == b"deep"
    assert os.listdir(root / "src") == []
    # A file moved between directories.
    write_file(root / "src" / "file", b"x")
    os.rename(root / "src" / "file", root / "dst" / "file2")
    assert sorted(os.listdir(root / "dst")) == ["file2", "moved"]


def test_rename_replaces_existing_file(weft):
    a, b = weft.path / "a", weft.path / "b"
    write_file(a, b"from a")
    write_file(b, b"old b, longer content")
    ino_a = os.stat(a).st_ino
    fd_old_b = os.open(b, os.O_RDONLY)
    try:
        os.rename(a, b)
        assert os.stat(b).st_ino == ino_a
        assert read_file(b) == b"from a"
        # An fd opened on the replaced file still reads the replaced data.
        assert os.pread(fd_old_b, 100, 0) == b"old b, longer content"
        assert os.fstat(fd_old_b).st_nlink == 0
    finally:
        os.close(fd_old_b)
    assert sorted(os.listdir(weft.path)) == ["b"]


def test_rename_directory_replaces_empty_directory(weft):
    base = nlink(weft.path)
    os.mkdir(weft.path / "d1")
    write_file(weft.path / "d1" / "f", b"1")
    os.mkdir(weft.path / "d2")
    assert nlink(weft.path) == base + 2
    os.rename(weft.path / "d1", weft.path / "d2")
    assert sorted(os.listdir(weft.path)) == ["d2"]
    assert read_file(weft.path / "d2" / "f") == b"1"
    assert nlink(weft.path) == base + 1


def test_rename_errors(weft):
    root = weft.path
    os.mkdir(root / "dir")
    os.mkdir(root / "full")
    write_file(root / "full" / "x", b"x")
    write_file(root / "file", b"f")
    assert_errno(errno.ENOTEMPTY, os.rename, root / "dir", root / "full")
    assert_errno(errno.EISDIR, os.rename, root / "file", root / "dir")
    assert_errno(errno.ENOTDIR, os.rename, root / "dir", root / "file")
    assert_errno(errno.ENOENT, os.rename, root / "missing", root / "new")
    assert_errno(errno.ENOENT, os.rename, root / "file", root / "nodir" / "new")
    assert_errno(errno.ENOTDIR, os.rename, root / "file", root / "file" / "new")
    # Moving a directory into itself or its own descendant.
    os.makedirs(root / "dir" / "sub" / "subsub")
    assert_errno(errno.EINVAL, os.rename, root / "dir", root / "dir" / "sub" / "x")
    assert_errno(errno.EINVAL, os.rename, root / "dir", root / "dir" / "x")
    assert_errno(errno.EINVAL, os.rename, root / "dir", root / "dir" / "sub" / "subsub" / "x")
    # Nothing moved.
    assert sorted(os.listdir(root)) == ["dir", "file", "full"]
    assert os.listdir(root / "full") == ["x"]
    assert read_file(root / "file") == b"f"


def test_rename_to_itself_and_between_hard_links(weft):
    a = weft.path / "a"
    write_file(a, b"same")
    os.rename(a, a)
    assert read_file(a) == b"same" and nlink(a) == 1
    os.mkdir(weft.path / "d")
    os.rename(weft.path / "d", weft.path / "d")
    assert os.path.isdir(weft.path / "d")
    # rename() between two names of one inode succeeds and does nothing (POSIX).
    os.link(a, weft.path / "b")
    os.rename(a, weft.path / "b")
    assert sorted(os.listdir(weft.path)) == ["a", "b", "d"]
    assert nlink(a) == 2


def test_rename_noreplace(weft):
    a, b = weft.path / "a", weft.path / "b"
    write_file(a, b"A")
    write_file(b, b"B")
    assert_errno(errno.EEXIST, renameat2, a, b, RENAME_NOREPLACE)
    assert read_file(a) == b"A" and read_file(b) == b"B"
    os.mkdir(weft.path / "d")
    assert_errno(errno.EEXIST, renameat2, a, weft.path / "d", RENAME_NOREPLACE)
    renameat2(a, weft.path / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(weft.path)) == ["b", "c", "d"]
    assert read_file(weft.path / "c") == b"A"


def test_rename_exchange_files(weft):
    a, b = weft.path / "a", weft.path / "b"
    write_file(a, b"AAAA")
    write_file(b, b"BB")
    ino_a, ino_b = os.stat(a).st_ino, os.stat(b).st_ino
    renameat2(a, b, RENAME_EXCHANGE)
    assert read_file(a) == b"BB" and read_file(b) == b"AAAA"
    assert os.stat(a).st_ino == ino_b and os.stat(b).st_ino == ino_a
    assert_errno(errno.ENOENT, renameat2, a, weft.path / "missing", RENAME_EXCHANGE)
    assert_errno(errno.EINVAL, renameat2, a, b, RENAME_EXCHANGE | RENAME_NOREPLACE)


def test_rename_exchange_file_and_directory_across_parents(weft):
    root = weft.path
    os.mkdir(root / "p1")
    os.mkdir(root / "p2")
    os.mkdir(root / "p1" / "dir")
    write_file(root / "p1" / "dir" / "inside", b"in dir")
    write_file(root / "p2" / "file", b"plain file")
    assert nlink(root / "p1") == 3 and nlink(root / "p2") == 2
    renameat2(root / "p1" / "dir", root / "p2" / "file", RENAME_EXCHANGE)
    assert stat.S_ISREG(os.lstat(root / "p1" / "dir").st_mode)
    assert read_file(root / "p1" / "dir") == b"plain file"
    assert stat.S_ISDIR(os.lstat(root / "p2" / "file").st_mode)
    assert read_file(root / "p2" / "file" / "inside") == b"in dir"
    assert nlink(root / "p1") == 2, "nlink of the parent that lost the directory"
    assert nlink(root / "p2") == 3, "nlink of the parent that gained the directory"
    assert os.stat(root / "p2" / "file" / "..").st_ino == os.stat(root / "p2").st_ino


def test_rename_exchange_directories(weft):
    root = weft.path
    os.makedirs(root / "x" / "xs")
    os.mkdir(root / "y")
    write_file(root / "y" / "yf", b"y")
    renameat2(root / "x", root / "y", RENAME_EXCHANGE)
    assert os.listdir(root / "x") == ["yf"]
    assert os.listdir(root / "y") == ["xs"]
    assert nlink(root / "x") == 2 and nlink(root / "y") == 3


# --------------------------------------------------------------------------- link / unlink

def test_hard_links(weft):
    a = weft.path / "a"
    write_file(a, b"linked")
    os.mkdir(weft.path / "d")
    os.link(a, weft.path / "d" / "b")
    os.link(a, weft.path / "c")
    st = os.stat(a)
    assert st.st_nlink == 3
    assert os.stat(weft.path / "d" / "b").st_ino == st.st_ino
    write_file(weft.path / "c", b"changed through c")
    assert read_file(weft.path / "d" / "b") == b"changed through c"
    os.unlink(a)
    assert nlink(weft.path / "c") == 2
    os.unlink(weft.path / "d" / "b")
    assert nlink(weft.path / "c") == 1
    assert read_file(weft.path / "c") == b"changed through c"
    assert_errno(errno.EEXIST, os.link, weft.path / "c", weft.path / "c")
    assert_errno(errno.ENOENT, os.link, weft.path / "missing", weft.path / "new")
    assert_errno(errno.EPERM, os.link, weft.path / "d", weft.path / "dlink")
    assert_errno(errno.ENOENT, os.link, weft.path / "c", weft.path / "nodir" / "x")


def test_hard_link_to_symlink(weft):
    os.symlink("target-name", weft.path / "s")
    os.link(weft.path / "s", weft.path / "s2", follow_symlinks=False)
    assert os.readlink(weft.path / "s2") == "target-name"
    assert nlink(weft.path / "s") == 2


def test_unlink_errors(weft):
    os.mkdir(weft.path / "d")
    write_file(weft.path / "f", b"")
    assert_errno(errno.ENOENT, os.unlink, weft.path / "missing")
    assert_errno(errno.EISDIR, os.unlink, weft.path / "d")
    assert_errno(errno.ENOTDIR, os.unlink, weft.path / "f" / "x")
    os.unlink(weft.path / "f")
    assert_errno(errno.ENOENT, os.stat, weft.path / "f")
    assert os.listdir(weft.path) == ["d"]


# --------------------------------------------------------------------------- symlinks

def test_symlink_and_readlink(weft):
    root = weft.path
    write_file(root / "target", b"through the link")
    os.symlink("target", root / "rel")
    os.symlink(str(root / "target"), root / "abs")
    st = os.lstat(root / "rel")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_size == len("target")
    assert os.readlink(root / "rel") == "target"
    assert os.readlink(root / "abs") == str(root / "target")
    assert read_file(root / "rel") == b"through the link"
    assert os.stat(root / "rel").st_ino == os.stat(root / "target").st_ino
    # Symlink to a directory.
    os.mkdir(root / "d")
    write_file(root / "d" / "inner", b"i")
    os.symlink("d", root / "dl")
    assert os.listdir(root / "dl") == ["inner"]
    # Dangling and odd targets are stored verbatim.
    odd = "does/not/../exist/" + "x" * 200
    os.symlink(odd, root / "dangling")
    assert os.readlink(root / "dangling") == odd
    assert_errno(errno.ENOENT, os.stat, root / "dangling")
    long_target = "L" * 4000
    os.symlink(long_target, root / "long")
    assert os.readlink(root / "long") == long_target
    assert os.lstat(root / "long").st_size == 4000
    # Errors.
    assert_errno(errno.EEXIST, os.symlink, "x", root / "target")
    assert_errno(errno.EINVAL, os.readlink, root / "target")
    assert_errno(errno.ENOENT, os.readlink, root / "missing")
    os.symlink("loop", root / "loop")
    assert_errno(errno.ELOOP, os.stat, root / "loop")
    # Removing the link leaves the target.
    os.unlink(root / "rel")
    assert read_file(root / "target") == b"through the link"


# --------------------------------------------------------------------------- directories

def test_mkdir_rmdir(weft):
    root = weft.path
    os.mkdir(root / "d", 0o750)
    st = os.stat(root / "d")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750
    assert st.st_nlink == 2
    assert os.listdir(root / "d") == []
    assert_errno(errno.EEXIST, os.mkdir, root / "d")
    write_file(root / "f", b"")
    assert_errno(errno.EEXIST, os.mkdir, root / "f")
    assert_errno(errno.ENOENT, os.mkdir, root / "missing" / "d")
    assert_errno(errno.ENOTDIR, os.mkdir, root / "f" / "d")
    write_file(root / "d" / "x", b"")
    assert_errno(errno.ENOTEMPTY, os.rmdir, root / "d")
    os.mkdir(root / "d2")
    os.mkdir(root / "d2" / "sub")
    assert_errno(errno.ENOTEMPTY, os.rmdir, root / "d2")
    assert_errno(errno.ENOENT, os.rmdir, root / "missing")
    assert_errno(errno.ENOTDIR, os.rmdir, root / "f")
    os.symlink("d", root / "dl")
    assert_errno(errno.ENOTDIR, os.rmdir, root / "dl")
    assert_errno(errno.EINVAL, os.rmdir, str(root / "d") + "/.")
    os.unlink(root / "d" / "x")
    os.rmdir(root / "d")
    assert_errno(errno.ENOENT, os.stat, root / "d")
    assert sorted(os.listdir(root)) == ["d2", "dl", "f"]


def test_directory_nlink_counts(weft):
    root = weft.path
    base = nlink(root)
    os.mkdir(root / "p")
    assert nlink(root) == base + 1
    assert nlink(root / "p") == 2
    for i in range(5):
        os.mkdir(root / "p" / f"s{i}")
    write_file(root / "p" / "file", b"")          # files do not count
    os.symlink("s0", root / "p" / "link")
    assert nlink(root / "p") == 7
    os.rmdir(root / "p" / "s4")
    assert nlink(root / "p") == 6
    os.rename(root / "p" / "s3", root / "s3")
    assert nlink(root / "p") == 5
    assert nlink(root) == base + 2
    os.rename(root / "s3", root / "p" / "s0")         # dir over empty dir
    assert nlink(root / "p") == 5
    assert nlink(root) == base + 1


def test_readdir_types_and_inodes(weft):
    root = weft.path
    os.mkdir(root / "d")
    write_file(root / "f", b"1")
    os.symlink("f", root / "s")
    entries = {e.name: e for e in os.scandir(root)}
    assert sorted(entries) == ["d", "f", "s"]
    assert entries["d"].is_dir(follow_symlinks=False)
    assert entries["f"].is_file(follow_symlinks=False)
    assert entries["s"].is_symlink()
    for name, e in entries.items():
        assert e.inode() == os.lstat(root / name).st_ino, f"d_ino of {name} differs from st_ino"
    inos = {os.lstat(root / n).st_ino for n in entries}
    assert len(inos) == 3
    assert os.stat(root / "d" / "..").st_ino == os.stat(root).st_ino
    assert os.stat(str(root / "d") + "/.").st_ino == os.stat(root / "d").st_ino


# --------------------------------------------------------------------------- name limits

def test_name_length_limit(weft):
    root = weft.path
    ok = "n" * 255
    too_long = "n" * 256
    write_file(root / ok, b"255")
    assert read_file(root / ok) == b"255"
    assert ok in os.listdir(root)
    assert_errno(errno.ENAMETOOLONG, os.open, root / too_long, os.O_WRONLY | os.O_CREAT, 0o644)
    assert_errno(errno.ENAMETOOLONG, os.mkdir, root / too_long)
    assert_errno(errno.ENAMETOOLONG, os.symlink, "x", root / too_long)
    assert_errno(errno.ENAMETOOLONG, os.link, root / ok, root / too_long)
    assert_errno(errno.ENAMETOOLONG, os.rename, root / ok, root / too_long)
    assert_errno(errno.ENAMETOOLONG, os.stat, root / too_long)
    os.mkdir(root / ("d" * 255))
    os.symlink("x", root / ("s" * 255))
    os.link(root / ok, root / ("l" * 255))
    os.rename(root / ok, root / ("r" * 255))
    assert sorted(os.listdir(root)) == sorted(["d" * 255, "s" * 255, "l" * 255, "r" * 255])
    # 255 *bytes*, not characters: 85 three-byte characters fit, 86 do not.
    write_file(root / ("€" * 85), b"utf8")
    assert_errno(errno.ENAMETOOLONG, os.open, root / ("€" * 86), os.O_WRONLY | os.O_CREAT, 0o644)


def test_names_are_arbitrary_bytes(weft):
    root = os.fsencode(weft.path)
    names = [b"\xff\xfe not utf-8", b"sp ace", b"tab\there", b"new\nline", b"-dash", b"..." ,
             b"\x01\x7f", "ünïcødé 日本".encode()]
    for i, name in enumerate(names):
        write_file(root + b"/" + name, bytes([i]))
    assert sorted(os.listdir(root)) == sorted(names)
    for i, name in enumerate(names):
        assert read_file(root + b"/" + name) == bytes([i])
    # Names differing only in case are distinct.
    write_file(weft.path / "Case", b"upper")
    write_file(weft.path / "case", b"lower")
    assert read_file(weft.path / "Case") == b"upper"
    assert read_file(weft.path / "case") == b"lower"


def _assert_removed_directory_handle(fd: int, mode: int):
    st = os.fstat(fd)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == mode, oct(st.st_mode)
    assert st.st_nlink == 0, f"a removed directory has no links, got {st.st_nlink}"
    assert os.listdir(fd) == [], "a removed directory lists nothing"
    assert_errno(errno.ENOENT, os.open, "new", os.O_CREAT | os.O_RDWR, 0o644, dir_fd=fd)


def test_a_directory_removed_while_open_keeps_its_handle(weft):
    """fstat and readdir of an open directory after its rmdir: as on a local file system
    (st_nlink 0, nothing listed), not ESTALE. Found by the model test (seed 52007)."""
    root = weft.path
    os.mkdir(root / "gone", 0o750)
    (root / "gone" / "f").write_bytes(b"x")
    fd = os.open(root / "gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.listdir(fd) == ["f"]
        os.unlink(root / "gone" / "f")
        os.rmdir(root / "gone")
        _assert_removed_directory_handle(fd, 0o750)
        assert_errno(errno.ENOENT, os.stat, root / "gone")
        os.mkdir(root / "gone")          # the name is free; the handle still shows the old one
        assert os.fstat(fd).st_nlink == 0
        assert os.stat(root / "gone").st_nlink == 2
    finally:
        os.close(fd)


def _utime_ns(fd: int, atime_ns: int, mtime_ns: int) -> None:
    os.utime(fd, ns=(atime_ns, mtime_ns))


def test_a_directory_removed_while_open_takes_fchmod_fchown_and_futimens(weft):
    """A local file system changes the unlinked directory's inode through the handle; so does
    Weft, on the handle's attributes (before: ENOENT from the home)."""
    os.mkdir(weft.path / "gone", 0o750)
    fd = os.open(weft.path / "gone", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(weft.path / "gone")
        before = os.fstat(fd)
        os.fchmod(fd, 0o705)
        os.fchown(fd, 1234, 5678)
        os.utime(fd, ns=(1_000_000_123, 2_000_000_456))
        after = os.fstat(fd)
        assert stat.S_ISDIR(after.st_mode) and stat.S_IMODE(after.st_mode) == 0o705, oct(after.st_mode)
        assert (after.st_uid, after.st_gid) == (1234, 5678)
        assert (after.st_atime_ns, after.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
        assert after.st_ctime_ns > before.st_ctime_ns and after.st_nlink == 0
        # The same rules as for a linked directory: only the owner (or root) changes the mode,
        # only root gives it away, and times other than now need the owner.
        assert run_as(4321, 4321, [], outcome, os.fchmod, fd, 0o777) == "EPERM"
        assert run_as(1234, 5678, [], outcome, os.fchown, fd, 4321, 5678) == "EPERM"
        assert run_as(1234, 5678, [], outcome, os.fchmod, fd, 0o700) == "OK"
        assert run_as(4321, 4321, [], outcome, _utime_ns, fd, 5, 5) == "EPERM"
        last = os.fstat(fd)
        assert stat.S_IMODE(last.st_mode) == 0o700 and (last.st_uid, last.st_gid) == (1234, 5678)
        assert os.listdir(fd) == []
    finally:
        os.close(fd)


def test_fchmod_of_a_directory_another_agent_removed_holds_at_once(weft):
    """The home still answers getattr of a just-removed inode with its last attributes for a
    while (RemovedInodes); a change made through this agent's handle must not be undone by
    that answer once the kernel asks again."""
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    other = weft.add_agent("mnt-b")
    os.mkdir(weft.path / "shared", 0o755)
    fd = os.open(weft.path / "shared", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(other / "shared")
        os.fchmod(fd, 0o711)
        deadline = time.monotonic() + 3      # past the kernel's 1 s attribute timeout, inside the 5 s
        while time.monotonic() < deadline:
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o711
            time.sleep(0.2)
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)


def test_a_directory_another_agent_removes_while_open_keeps_its_handle(weft):
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    other = weft.add_agent("mnt-b")
    os.mkdir(weft.path / "shared", 0o700)
    fd = os.open(weft.path / "shared", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(other / "shared")
        assert os.listdir(fd) == [], "a removed directory lists nothing"
        # For 5 s the home answers another session's getattr of an inode it just removed with
        # its last attributes (SPEC.md §12.6, RemovedInodes); then the handle's, unlinked.
        deadline = time.monotonic() + 10
        while os.fstat(fd).st_nlink != 0 and time.monotonic() < deadline:
            time.sleep(0.25)
        _assert_removed_directory_handle(fd, 0o700)
    finally:
        os.close(fd)
