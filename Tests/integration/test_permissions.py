"""Permission checks as unprivileged users: forked children drop to another uid/gid/groups,
try system calls and report each outcome ('OK' or the errno name) through a pipe."""

from __future__ import annotations

import os
import stat

import pytest

from posix_helpers import outcome, read_file, run_as, utimensat, write_file

NOBODY = (65534, 65534, [])                # uid, gid, supplementary groups
USER = (1000, 1000, [2000])                # member of group 2000
USER_NO_GROUPS = (1000, 1000, [])
OTHER_GROUP = 3000


def as_user(who, fn, *args):
    uid, gid, groups = who
    return run_as(uid, gid, groups, fn, *args)


@pytest.fixture
def work(weft):
    """A 0755 root-owned directory inside the volume, reachable by everyone."""
    outcome_root = as_user(NOBODY, lambda p: outcome(os.stat, p), str(weft.path))
    assert outcome_root == "OK", (f"an unprivileged user cannot even stat the volume root "
                                  f"({outcome_root}); its mode is "
                                  f"{oct(os.stat(weft.path).st_mode)}")
    d = weft.path / "perm"
    os.mkdir(d)
    os.chmod(d, 0o755)
    return d


def test_root_of_a_new_volume_is_searchable_and_owned_by_root(weft):
    st = os.stat(weft.path)
    assert stat.S_ISDIR(st.st_mode)
    assert st.st_mode & 0o005 == 0o005, f"volume root mode {oct(st.st_mode)} is not o+rx"


def test_eacces_read_create_search(work):
    write_file(work / "secret", b"root only", 0o600)
    os.chmod(work / "secret", 0o600)
    os.mkdir(work / "rootdir")
    os.chmod(work / "rootdir", 0o755)
    write_file(work / "rootdir" / "existing", b"x", 0o644)
    os.mkdir(work / "noexec")
    write_file(work / "noexec" / "inner", b"x", 0o644)
    os.chmod(work / "noexec", 0o666)           # readable, not searchable
    write_file(work / "readonly", b"ro", 0o644)
    os.chmod(work / "readonly", 0o644)

    def child(w):
        return {
            "read 0600 root file": outcome(os.open, f"{w}/secret", os.O_RDONLY),
            "create in 0755 root dir": outcome(os.open, f"{w}/rootdir/new",
                                               os.O_WRONLY | os.O_CREAT, 0o644),
            "mkdir in 0755 root dir": outcome(os.mkdir, f"{w}/rootdir/newdir"),
            "unlink in 0755 root dir": outcome(os.unlink, f"{w}/rootdir/existing"),
            "rename in 0755 root dir": outcome(os.rename, f"{w}/rootdir/existing",
                                               f"{w}/rootdir/moved"),
            "stat in dir without x": outcome(os.stat, f"{w}/noexec/inner"),
            "open in dir without x": outcome(os.open, f"{w}/noexec/inner", os.O_RDONLY),
            "write 0644 root file": outcome(os.open, f"{w}/readonly", os.O_WRONLY),
            "truncate 0644 root file": outcome(os.truncate, f"{w}/readonly", 0),
            "read 0644 root file": outcome(os.open, f"{w}/readonly", os.O_RDONLY),
            "read 0755 root dir": outcome(os.listdir, f"{w}/rootdir"),
        }

    got = as_user(NOBODY, child, str(work))
    assert got == {
        "read 0600 root file": "EACCES",
        "create in 0755 root dir": "EACCES",
        "mkdir in 0755 root dir": "EACCES",
        "unlink in 0755 root dir": "EACCES",
        "rename in 0755 root dir": "EACCES",
        "stat in dir without x": "EACCES",
        "open in dir without x": "EACCES",
        "write 0644 root file": "EACCES",
        "truncate 0644 root file": "EACCES",
        "read 0644 root file": "OK",
        "read 0755 root dir": "OK",
    }
    assert sorted(os.listdir(work / "rootdir")) == ["existing"]
    assert read_file(work / "readonly") == b"ro"


def test_supplementary_group_grants_access(work):
    write_file(work / "grp", b"group data", 0o070)
    os.chown(work / "grp", 0, 2000)
    os.chmod(work / "grp", 0o070)

    def child(p):
        r = outcome(os.open, p, os.O_RDONLY)
        w = outcome(os.open, p, os.O_WRONLY)
        return {"read": r, "write": w}

    assert as_user(USER, child, str(work / "grp")) == {"read": "OK", "write": "OK"}, \
        "a member of group 2000 (supplementary) must get the group bits"
    assert as_user(USER_NO_GROUPS, child, str(work / "grp")) == \
        {"read": "EACCES", "write": "EACCES"}, "without the supplementary group: no access"
    assert as_user(NOBODY, child, str(work / "grp")) == {"read": "EACCES", "write": "EACCES"}
    # Owner bits win over group bits: an owner with 0o070 and the group has no access.
    os.chown(work / "grp", 1000, 2000)
    assert as_user(USER, child, str(work / "grp")) == {"read": "EACCES", "write": "EACCES"}, \
        "the owner class applies to the owner even when the group class would allow"


def test_eperm_on_files_of_others(work):
    write_file(work / "shared", b"x", 0o666)
    os.chmod(work / "shared", 0o666)            # writable by all, owned by root
    write_file(work / "plain", b"x", 0o644)
    os.chmod(work / "plain", 0o644)
    when = 1_000_000_000 * 1_000_000_000

    def child(w):
        return {
            "chmod others' file": outcome(os.chmod, f"{w}/shared", 0o777),
            "chown others' file to self": outcome(os.chown, f"{w}/shared", 65534, -1),
            "chgrp others' file": outcome(os.chown, f"{w}/shared", -1, 65534),
            "explicit utimes, not owner": outcome(utimensat, f"{w}/shared", when, when),
            "utimes now, writable": outcome(os.utime, f"{w}/shared", None),
            "utimes now, not writable": outcome(os.utime, f"{w}/plain", None),
        }

    got = as_user(NOBODY, child, str(work))
    assert got == {
        "chmod others' file": "EPERM",
        "chown others' file to self": "EPERM",
        "chgrp others' file": "EPERM",
        "explicit utimes, not owner": "EPERM",
        "utimes now, writable": "OK",
        "utimes now, not writable": "EACCES",
    }
    st = os.stat(work / "shared")
    assert stat.S_IMODE(st.st_mode) == 0o666 and (st.st_uid, st.st_gid) == (0, 0)


def test_new_files_belong_to_the_caller(work):
    os.mkdir(work / "pub")
    os.chmod(work / "pub", 0o777)

    def child(w, name):
        fd = os.open(f"{w}/pub/{name}.f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.mkdir(f"{w}/pub/{name}.d")
        os.symlink("x", f"{w}/pub/{name}.s")
        return [list(os.lstat(f"{w}/pub/{name}.{k}")[4:6]) for k in "fds"]

    assert as_user(NOBODY, child, str(work), "nobody") == [[65534, 65534]] * 3
    assert as_user(USER, child, str(work), "user") == [[1000, 1000]] * 3
    for name, ids in (("nobody", (65534, 65534)), ("user", (1000, 1000))):
        for kind in "fds":
            st = os.lstat(work / "pub" / f"{name}.{kind}")
            assert (st.st_uid, st.st_gid) == ids, f"{name}.{kind} seen by root"


def test_owner_may_chgrp_only_to_own_groups(work):
    os.mkdir(work / "pub")
    os.chmod(work / "pub", 0o777)

    def child(w):
        p = f"{w}/pub/mine"
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
        result = {
            "chgrp to supplementary group": outcome(os.chown, p, -1, 2000),
            "gid after": os.stat(p).st_gid,
            "chgrp to foreign group": outcome(os.chown, p, -1, OTHER_GROUP),
            "chown to another uid": outcome(os.chown, p, 65534, -1),
            "chown to own uid": outcome(os.chown, p, 1000, -1),
            "chmod own file": outcome(os.chmod, p, 0o600),
            "explicit utimes own file": outcome(utimensat, p, 10**18, 10**18),
        }
        result["final"] = [os.stat(p).st_uid, os.stat(p).st_gid,
                           stat.S_IMODE(os.stat(p).st_mode)]
        return result

    got = as_user(USER, child, str(work))
    assert got == {
        "chgrp to supplementary group": "OK",
        "gid after": 2000,
        "chgrp to foreign group": "EPERM",
        "chown to another uid": "EPERM",
        "chown to own uid": "OK",
        "chmod own file": "OK",
        "explicit utimes own file": "OK",
        "final": [1000, 2000, 0o600],
    }


def test_sticky_directory(work):
    os.mkdir(work / "tmp")
    os.chmod(work / "tmp", 0o1777)
    assert stat.S_IMODE(os.stat(work / "tmp").st_mode) == 0o1777

    def make(w):
        write_file(f"{w}/tmp/bfile", b"B's data", 0o666)
        os.chmod(f"{w}/tmp/bfile", 0o666)
        os.mkdir(f"{w}/tmp/bdir")
        os.chmod(f"{w}/tmp/bdir", 0o777)
        return "OK"

    as_user(NOBODY, make, str(work))

    def intruder(w):
        return {
            "unlink B's file": outcome(os.unlink, f"{w}/tmp/bfile"),
            "rename B's file": outcome(os.rename, f"{w}/tmp/bfile", f"{w}/tmp/stolen"),
            "rename over B's file": outcome(lambda: (write_file(f"{w}/tmp/afile", b"A"),
                                                     os.rename(f"{w}/tmp/afile",
                                                               f"{w}/tmp/bfile"))),
            "rmdir B's empty dir": outcome(os.rmdir, f"{w}/tmp/bdir"),
            "write B's 0666 file": outcome(os.open, f"{w}/tmp/bfile", os.O_WRONLY),
            "own file unlink": outcome(lambda: (write_file(f"{w}/tmp/own", b"mine"),
                                                os.unlink(f"{w}/tmp/own"))),
        }

    got = as_user(USER, intruder, str(work))
    for key in ("unlink B's file", "rename B's file", "rename over B's file", "rmdir B's empty dir"):
        assert got[key] in ("EPERM", "EACCES"), f"sticky dir: {key}: got {got[key]}, expected EPERM"
    assert got["write B's 0666 file"] == "OK"
    assert got["own file unlink"] == "OK"
    assert read_file(work / "tmp" / "bfile") == b"B's data"
    assert os.path.isdir(work / "tmp" / "bdir")
    # The owner of the directory (root here) and the file's owner may delete.
    assert as_user(NOBODY, outcome, os.unlink, str(work / "tmp" / "bfile")) == "OK"
    os.rmdir(work / "tmp" / "bdir")


def test_setgid_directory_inheritance(work):
    os.mkdir(work / "sg")
    os.chown(work / "sg", 0, 2000)
    os.chmod(work / "sg", 0o2777)
    assert stat.S_IMODE(os.stat(work / "sg").st_mode) == 0o2777

    def child(w, name):
        os.close(os.open(f"{w}/sg/{name}", os.O_WRONLY | os.O_CREAT, 0o644))
        os.mkdir(f"{w}/sg/{name}.d", 0o755)
        f, d = os.stat(f"{w}/sg/{name}"), os.stat(f"{w}/sg/{name}.d")
        return {"file": [f.st_uid, f.st_gid], "dir": [d.st_uid, d.st_gid],
                "dir setgid": bool(d.st_mode & stat.S_ISGID),
                "file setgid": bool(f.st_mode & stat.S_ISGID)}

    expected_member = {"file": [1000, 2000], "dir": [1000, 2000], "dir setgid": True,
                       "file setgid": False}
    assert as_user(USER, child, str(work), "member") == expected_member
    expected_nobody = {"file": [65534, 2000], "dir": [65534, 2000], "dir setgid": True,
                       "file setgid": False}
    assert as_user(NOBODY, child, str(work), "nobody") == expected_nobody
    # Inheritance continues one level down (the new subdirectory carries the bit).
    os.close(os.open(work / "sg" / "member.d" / "deeper", os.O_WRONLY | os.O_CREAT, 0o644))
    assert os.stat(work / "sg" / "member.d" / "deeper").st_gid == 2000


def test_write_permission_checked_at_open_not_write(work):
    """An fd opened for writing keeps working after chmod removes write permission."""
    os.mkdir(work / "pub")
    os.chmod(work / "pub", 0o777)

    def child(w):
        p = f"{w}/pub/f"
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        os.chmod(p, 0o444)
        os.write(fd, b"still writable")
        os.close(fd)
        return {"reopen for write": outcome(os.open, p, os.O_WRONLY),
                "content": read_file(p).decode()}

    assert as_user(NOBODY, child, str(work)) == {"reopen for write": "EACCES",
                                                 "content": "still writable"}
