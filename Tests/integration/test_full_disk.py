"""A hub whose disk fills up (SPEC.md §9.1): writes fail with ENOSPC, metadata changes go on,
an unlink gives the space back, and nothing leaks or is corrupted.

The hub runs on the real disk with a space reserve that leaves it about 192 MiB for file data,
so the test needs no loop device and no privileges beyond FUSE."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from posix_helpers import read_file, write_file
from weft_harness import wait_until

MiB = 1024 * 1024
DATA_ROOM_MIB = 192


def stored_object_bytes(hub_dir: Path) -> int:
    """Bytes of every file in the hub's chunk store."""
    total = 0
    for directory, _, files in os.walk(hub_dir / "chunks"):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except FileNotFoundError:
                pass
    return total


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill_until_enospc(path: Path, limit_mib: int) -> int:
    """Writes 1 MiB blocks, one at the start of each 4 MiB chunk (so that every commit uploads
    several objects and the one that meets the full disk is not the first), fsync every 8,
    until a call fails; returns the MiB written. The failure must be ENOSPC; close may report
    it too."""
    block = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    failure = None
    try:
        while written < limit_mib:
            os.pwrite(fd, block, written * 4 * MiB)
            written += 1
            if written % 8 == 0:
                os.fsync(fd)
    except OSError as error:
        failure = error
    finally:
        try:
            os.close(fd)
        except OSError as error:
            failure = failure or error
            assert error.errno == errno.ENOSPC, f"close failed with {error!r}, not ENOSPC"
    assert failure is not None, f"wrote {written} MiB into a hub with about {DATA_ROOM_MIB} MiB of room"
    assert failure.errno == errno.ENOSPC, f"the full disk failed with {failure!r}, not ENOSPC"
    return written


@pytest.mark.weft_timeout(300)
def test_a_full_hub_disk_keeps_metadata_working_and_gives_space_back(weft_factory, resources):
    free = free_bytes(resources.base)
    assert free > (DATA_ROOM_MIB + 512) * MiB, f"the test needs {DATA_ROOM_MIB + 512} MiB free, has {free >> 20}"
    reserve_mib = free // MiB - DATA_ROOM_MIB
    weft = weft_factory(hub_args=["--reserve-mb", reserve_mib], mount_args=["--write-buffer-mb", 32])
    weft.require_weft("fills a Weft hub")
    root = weft.path

    keep = os.urandom(8 * MiB + 123)
    write_file(root / "keep", keep, fsync=True)

    written = fill_until_enospc(root / "big", limit_mib=4 * DATA_ROOM_MIB)
    assert written < 2 * DATA_ROOM_MIB
    st = os.statvfs(root)
    assert st.f_bavail * st.f_frsize < 32 * MiB, f"statfs shows {st.f_bavail * st.f_frsize >> 20} MiB free on a full hub"
    assert weft.status_any()["freeBytes"] < 32 * MiB, "weft status shows room on a full hub"

    # Metadata changes work on the full hub.
    os.mkdir(root / "dir")
    write_file(root / "dir" / "empty", b"")
    os.rename(root / "dir" / "empty", root / "dir" / "renamed")
    os.symlink("keep", root / "link")
    assert os.readlink(root / "link") == "keep"
    os.unlink(root / "dir" / "renamed")
    os.rmdir(root / "dir")
    # Still full for data (what a failed attempt wrote was discarded, so a little room may be
    # back, but not 64 MiB).
    fill_until_enospc(root / "more", limit_mib=64)

    # Unlinking the big file gives its space back, buffered writes included.
    os.unlink(root / "big")
    os.unlink(root / "more")
    assert wait_until(lambda: stored_object_bytes(weft.hub_dir) < 10 * MiB, 30), \
        f"{stored_object_bytes(weft.hub_dir) >> 20} MiB of objects left 30 s after the unlink"
    after = os.urandom(16 * MiB + 7)
    write_file(root / "after", after, fsync=True)
    assert read_file(root / "keep") == keep
    assert read_file(root / "after") == after
    # No object of a failed attempt is left: only the two files' data.
    time.sleep(2)   # a background retry, if any were left, would have run
    stored = stored_object_bytes(weft.hub_dir)
    assert stored < len(keep) + len(after) + MiB, f"{stored >> 20} MiB of objects for {(len(keep) + len(after)) >> 20} MiB of data"

    weft.remount()
    assert read_file(weft.path / "keep") == keep
    assert read_file(weft.path / "after") == after
    assert sorted(os.listdir(weft.path)) == ["after", "keep", "link"]
    check = weft.fsck()
    assert check.rc == 0, f"weft fsck after a full disk:\n{check.describe()}"


def fill_disk(directory: Path, leave_bytes: int = 4096) -> Path:
    """A file that takes all but `leave_bytes` of the file system holding `directory`."""
    filler = directory / "filler"
    room = free_bytes(directory) - leave_bytes
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, room)
    finally:
        os.close(fd)
    return filler


def create_until_error(directory: Path, limit: int) -> tuple[int, OSError]:
    os.makedirs(directory, exist_ok=True)
    for i in range(limit):
        try:
            os.close(os.open(directory / f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
        except OSError as error:
            return i, error
    raise AssertionError(f"{limit} creates on a full metadata disk all succeeded")


@pytest.mark.weft_timeout(300)
def test_a_full_metadata_disk_refuses_changes_and_recovers_without_a_restart(mode, weft_factory, resources):
    # The hub on a 96 MiB tmpfs that another file fills (SPEC.md §3.3, Full disk). Before, the
    # hub process aborted inside RocksDB (Debian's build asserts once a write of its files or
    # of its LOG has failed), or RocksDB refused every change until a restart.
    assert os.geteuid() == 0, "mounting the test's tmpfs needs root"
    small = resources.base / "fs-hub"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(small)], check=True)
    try:
        weft = weft_factory()
        weft.require_weft("fills a Weft hub's metadata disk")
        root = weft.path
        filler = fill_disk(small)
        made, failure = create_until_error(root / "d", limit=200_000)
        assert failure.errno == errno.ENOSPC, f"create {made} on a full metadata disk failed with {failure!r}"
        assert made > 100
        for i in range(100):   # every later change fails too, none at random succeeds
            with pytest.raises(OSError) as again:
                os.mkdir(root / f"again-{i}")
            assert again.value.errno == errno.ENOSPC
        assert len(os.listdir(root / "d")) == made, "the hub lost or kept a create that failed"
        assert os.stat(root / "d" / "f000000").st_size == 0, "reads stop on a full metadata disk"

        filler.unlink()
        os.close(os.open(root / "after-free", os.O_CREAT | os.O_WRONLY, 0o644))
        os.mkdir(root / "dir-after-free")

        # Full again, then the hub closes (remote: weftd stops; embedded: the agent unmounts):
        # no checkpoint fits, the journal keeps every change, and the process exits cleanly.
        filler = fill_disk(small)
        with weft.offline():
            logs = "".join(p.read_text(errors="replace") for p in resources.log_dir.iterdir() if p.is_file())
            assert "Program crashed" not in logs, "a Weft process crashed on the full disk"
            assert "closing the metadata store without a checkpoint" in logs
            # Opening the hub on the still full disk fails with a clear error, not an abort.
            refused = weft.fsck(source=str(weft.hub_dir))
            assert refused.rc != 0, f"the hub opened on a full metadata disk:\n{refused.describe()}"
            assert "free some space" in refused.describe(), refused.describe()
            assert "crashed" not in refused.describe(), refused.describe()
            filler.unlink()
        names = set(os.listdir(root / "d"))
        assert len(names) == made and "f000000" in names
        assert os.path.exists(root / "after-free") and os.path.isdir(root / "dir-after-free")
        check = weft.fsck()
        assert check.rc == 0, f"weft fsck after a full metadata disk:\n{check.describe()}"
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
