"""A hub whose disk fills up (SPEC.md §9.1): writes fail with ENOSPC, metadata changes go on,
an unlink gives the space back, and nothing leaks or is corrupted.

The hub runs on the real disk with a space reserve that leaves it about 192 MiB for file data,
so the test needs no loop device and no privileges beyond FUSE."""

from __future__ import annotations

import errno
import os
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
