"""Co-located reads (SPEC.md §4): an agent on weftd's machine reads file data from the hub's
chunk store itself, through a descriptor weftd hands over an abstract Unix socket; everything
else goes over TCP. Remote mode only: the embedded mount reads its own store anyway."""
from __future__ import annotations

import errno
import os
import random
import re
import socket
import time

from posix_helpers import MiB, read_file, write_file
from test_persistence import _corrupt_largest_chunk_file

ON = "co-located reads on: reading objects from "


def _log(mount) -> str:
    return "".join(path.read_text("utf-8", "replace") for path in mount.log_paths if path.exists())


def _reads_from_the_store(mount) -> tuple[int, int]:
    """(reads from the store, reads sent to the hub after trying it) of an unmounted agent."""
    found = re.findall(r"co-located reads: (\d+) from the hub's store, (\d+) sent to the hub", _log(mount))
    assert found, f"no co-located read count in the agent's log:\n{_log(mount)[-3000:]}"
    return int(found[-1][0]), int(found[-1][1])


def test_an_agent_beside_weftd_reads_the_store_itself(weft):
    weft.require_weft("reads through weftd")
    weft.require_mode("remote")
    data = random.Random(5601).randbytes(8 * MiB + 12345)
    write_file(weft.path / "f", data, fsync=True)
    weft.remount()                                  # nothing of it cached in the agent
    assert read_file(weft.path / "f") == data
    mount = weft.mount_obj
    log = _log(mount)
    assert ON + str((weft.hub_dir / "chunks").resolve()) in log, log[-3000:]
    assert "co-located reads offered" in weft.daemon.log_path.read_text("utf-8", "replace")
    weft.unmount()
    try:
        served, fell_back = _reads_from_the_store(mount)
        assert served >= 3 and fell_back == 0, (served, fell_back)   # 8 MiB: three 4 MiB chunks at least
    finally:
        weft.mount()


def test_an_agent_with_local_reads_off_reads_over_the_network(weft):
    weft.require_weft("reads through weftd")
    weft.require_mode("remote")
    data = random.Random(5602).randbytes(6 * MiB)
    write_file(weft.path / "f", data, fsync=True)
    other = weft.add_agent("mnt-b", options=["--local-reads", "off"])
    assert read_file(other / "f") == data
    assert ON not in _log(weft.extra_mounts[-1])
    # The default agent beside it, restarted, does read the store: the difference is the option.
    weft.remount()
    assert read_file(weft.path / "f") == data
    assert ON in _log(weft.mount_obj)


def test_a_weftd_with_local_reads_off_offers_nothing(weft):
    weft.require_weft("restarts weftd")
    weft.require_mode("remote")
    data = random.Random(5603).randbytes(3 * MiB)
    write_file(weft.path / "f", data, fsync=True)
    with weft.offline():
        weft.daemon.extra_args.extend(["--local-reads", "off"])
    assert read_file(weft.path / "f") == data
    assert ON not in _log(weft.mount_obj)
    r = weft.cli.weftd("serve", str(weft.hub_dir), "--listen", "127.0.0.1:1", "--local-reads", "maybe")
    assert r.rc != 0 and "--local-reads must be on or off" in r.err, r.describe()
    r = weft.cli.weft("mount", weft.daemon.url, str(weft.res.new_dir("mnt-x")), "--local-reads", "maybe")
    assert r.rc != 0 and "--local-reads must be auto or off" in r.err, r.describe()


def test_a_damaged_block_read_from_the_store_is_eio_and_named_by_both(weft):
    """The agent finds the damage (its log names the chunk), reads the block once more
    through weftd, which finds it too and logs it as without co-located reads: EIO, never
    wrong bytes."""
    weft.require_weft("corrupts a chunk file of the hub")
    weft.require_mode("remote")
    data = random.Random(5604).randbytes(2 * MiB)
    write_file(weft.path / "f", data, fsync=True)
    with weft.offline():
        victim = _corrupt_largest_chunk_file(weft, 1 * MiB)
    try:
        got = read_file(weft.path / "f")
    except OSError as error:
        assert error.errno == 5, error          # EIO
    else:
        raise AssertionError(f"read {len(got)} bytes of a file whose chunk {victim.name} is damaged")
    assert ON in _log(weft.mount_obj)
    assert f"chunk {victim.name} damaged" in _log(weft.mount_obj)
    assert f"chunk {victim.name} damaged" in weft.daemon.log_path.read_text("utf-8", "replace")


def test_only_root_or_weftds_user_gets_the_store(weft):
    """A process of another user that reaches weftd's socket gets EPERM and no descriptor,
    before it sends anything (weftd checks the peer first)."""
    weft.require_weft("reads weftd's log")
    weft.require_mode("remote")
    if os.geteuid() != 0:
        raise AssertionError("this suite runs as root (it mounts FUSE file systems)")
    log = weft.daemon.log_path.read_text("utf-8", "replace")
    names = re.findall(r"socket=@(weft-local-reads-[0-9a-f]{32})", log)
    assert names, log[-2000:]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:                                   # the other user
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.settimeout(5)
            peer.connect("\0" + names[-1])
            message, ancillary, _, _ = peer.recvmsg(8, socket.CMSG_SPACE(4))
            os.write(writer, message + bytes([len(ancillary)]))
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(child, 0)
    assert answer == b"WEFTLR" + bytes([errno.EPERM, 0]) + bytes([0]), answer
    assert "co-located reads refused to a process of another user" in weft.daemon.log_path.read_text("utf-8", "replace")


WRITES = re.compile(r"co-located writes: (\d+) object\(s\) written into the hub's store, (\d+) sent to the hub")


def _temporary_files(weft) -> list[str]:
    return sorted(str(p) for p in (weft.hub_dir / "chunks").rglob("*.tmp"))


def test_an_agent_beside_weftd_writes_into_the_store(weft):
    """Co-located writes (SPEC.md §4): the agent writes each object into weftd's store and
    weftd takes it over; nothing is left under a temporary name, and weftd counts, syncs and
    checks the objects as its own."""
    weft.require_weft("reads weftd's store")
    weft.require_mode("remote")
    data = random.Random(5605).randbytes(9 * MiB + 777)
    write_file(weft.path / "f", data, fsync=True)
    write_file(weft.path / "small", b"tiny", fsync=True)
    mount = weft.mount_obj
    weft.unmount()
    try:
        found = WRITES.findall(_log(mount))
        assert found, _log(mount)[-3000:]
        adopted, sent = int(found[-1][0]), int(found[-1][1])
        assert adopted >= 4 and sent == 0, (adopted, sent)     # three chunks of f at least, and small
    finally:
        weft.mount()
    assert _temporary_files(weft) == []
    assert read_file(weft.path / "f") == data
    assert read_file(weft.path / "small") == b"tiny"
    r = weft.cli.weft("fsck", weft.daemon.url)
    assert r.rc == 0 and "clean" in r.out, r.describe()
    r = weft.cli.weft("status", weft.daemon.url, "--json")
    assert r.rc == 0 and '"chunks"' in r.out, r.describe()
    # An agent with --local-writes off sends them over TCP: it reads the store, writes nothing
    # into it.
    other = weft.add_agent("mnt-w", options=["--local-writes", "off"])
    write_file(other / "g", data[:5 * MiB], fsync=True)
    assert read_file(other / "f") == data
    assert read_file(weft.path / "g") == data[:5 * MiB]
    result = weft.extra_mounts[-1].umount()
    assert result.rc == 0, result.describe()
    log = weft.extra_mounts[-1].log_file.read_text("utf-8", "replace")
    assert "co-located reads: " in log and "co-located writes" not in log, log[-3000:]
    r = weft.cli.weft("mount", weft.daemon.url, str(weft.res.new_dir("mnt-y")), "--local-writes", "maybe")
    assert r.rc != 0 and "--local-writes must be auto or off" in r.err, r.describe()


def test_weftd_removes_an_agents_leftover_temporary_files_when_it_starts(weft):
    """An agent killed between writing an object into the store and weftd's taking it over
    leaves a temporary file: weftd removes it when it next starts, and fsck stays clean."""
    weft.require_weft("restarts weftd")
    weft.require_mode("remote")
    data = random.Random(5606).randbytes(2 * MiB)
    write_file(weft.path / "f", data, fsync=True)
    with weft.offline():
        leftover = weft.hub_dir / "chunks" / "3c" / "000000000000ff3c.80000007.tmp"
        leftover.write_bytes(b"half an object")
    assert not leftover.exists()
    assert "/chunks/3c/000000000000ff3c.80000007.tmp" in weft.daemon.log_path.read_text("utf-8", "replace")
    assert read_file(weft.path / "f") == data
    r = weft.cli.weft("fsck", weft.daemon.url)
    assert r.rc == 0 and "clean" in r.out, r.describe()


def test_fsck_reports_and_removes_a_temporary_file_no_agent_handed_over(weft):
    """While weftd runs, a file an agent wrote into the store and never handed over (killed in
    between) stays; fsck reports it once it is older than the orphans' grace, and --repair
    removes it (SPEC.md §4, Co-located writes)."""
    weft.require_weft("reads weftd's store")
    weft.require_mode("remote")
    leftover = weft.hub_dir / "chunks" / "3d" / "000000000000ff3d.80000009.tmp"
    leftover.write_bytes(b"half an object")
    r = weft.cli.weft("fsck", weft.daemon.url)
    assert r.rc == 0 and "clean" in r.out, r.describe()           # new, and an agent is connected
    old = time.time() - 600
    os.utime(leftover, (old, old))
    r = weft.cli.weft("fsck", weft.daemon.url)
    assert r.rc != 0 and "temporary file (tag 80000009" in r.out, r.describe()
    assert leftover.exists()
    r = weft.cli.weft("fsck", weft.daemon.url, "--repair")
    assert r.rc == 0 and "temporary file(s) co-located agents never handed over" in r.out, r.describe()
    assert not leftover.exists()
    r = weft.cli.weft("fsck", weft.daemon.url)
    assert r.rc == 0 and "clean" in r.out, r.describe()

