"""Scale: a directory of 100,000 entries, a sparse file past 4 GiB, concurrent writers."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from posix_helpers import (GiB, MiB, assert_errno, assert_same_bytes, pread_exact, pwrite_all,
                           sha256_file, write_all)

BIG_DIR_ENTRIES = int(os.environ.get("WEFT_BIGDIR_ENTRIES", "100000"))
#: The default run's directory size: several readdir pages (at most 4096 entries each).
WRITERS = int(os.environ.get("WEFT_WRITERS", "8"))
WRITER_MIB = int(os.environ.get("WEFT_WRITER_MB", "32"))


def _in_threads(count: int, fn, items):
    """Runs fn over items split across `count` threads; re-raises the first error."""
    items = list(items)
    shards = [items[i::count] for i in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        for f in [pool.submit(lambda s=s: [fn(x) for x in s]) for s in shards]:
            f.result()


@pytest.mark.weft_timeout(1500)
def test_directory_with_100k_entries(weft):
    _big_directory(weft, BIG_DIR_ENTRIES)


def _big_directory(weft, count: int):
    d = weft.path / "big"
    os.mkdir(d)
    names = [f"entry-{i:06d}" for i in range(count)]

    def create(name):
        os.close(os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    t0 = time.monotonic()
    _in_threads(4, create, names)
    t_create = time.monotonic() - t0

    t0 = time.monotonic()
    listed = os.listdir(d)
    t_list = time.monotonic() - t0
    assert len(listed) == len(names), \
        f"readdir returned {len(listed)} entries for {len(names)} files (duplicates or losses)"
    assert set(listed) == set(names)
    with os.scandir(d) as it:
        scanned = sum(1 for e in it if e.is_file(follow_symlinks=False))
    assert scanned == len(names)

    rng = random.Random(5)
    for name in rng.sample(names, 300):
        st = os.stat(d / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    for i in range(20):
        assert_errno(errno.ENOENT, os.stat, d / f"entry-x{i}")
    assert os.stat(d).st_nlink == 2

    t0 = time.monotonic()
    _in_threads(4, lambda name: os.unlink(d / name), names)
    t_unlink = time.monotonic() - t0
    assert os.listdir(d) == []
    os.rmdir(d)
    assert os.listdir(weft.path) == []
    print(f"{len(names)} entries: create {t_create:.1f}s, readdir {t_list:.1f}s, "
          f"unlink {t_unlink:.1f}s")


def test_sparse_file_beyond_4gib(weft):
    p = weft.path / "sparse"
    data_offset = 5 * GiB + 3 * 1024
    data = random.Random(3).randbytes(5000)
    edge = b"4GiB-edge!"                               # straddles 2**32: 32-bit offset bugs
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pwrite_all(fd, data, data_offset)
        pwrite_all(fd, edge, 4 * GiB - 5)
        assert os.fstat(fd).st_size == data_offset + len(data)
        assert pread_exact(fd, len(data), data_offset) == data
        assert pread_exact(fd, len(edge), 4 * GiB - 5) == edge
    finally:
        os.close(fd)

    def check():
        assert os.stat(p).st_size == data_offset + len(data)
        fd = os.open(p, os.O_RDONLY)
        try:
            for offset, size in [(0, 1 * MiB), (4 * GiB - 1 * MiB, 1 * MiB - 5),
                                 (4 * GiB + 5, 1 * MiB), (data_offset - 64 * 1024, 64 * 1024),
                                 (5 * GiB - 100, 200)]:
                assert pread_exact(fd, size, offset) == bytes(size), \
                    f"hole at {offset} (+{size}) does not read as zeros"
            assert pread_exact(fd, 200, data_offset - 100) == bytes(100) + data[:100]
            assert_same_bytes(pread_exact(fd, len(data) + 100, data_offset), data,
                              "data past 5 GiB")
            assert pread_exact(fd, len(edge), 4 * GiB - 5) == edge
            assert os.pread(fd, 10, data_offset + len(data)) == b""
        finally:
            os.close(fd)

    check()
    weft.remount()
    check()
    used = os.stat(p).st_blocks * 512
    assert used < 64 * MiB, f"a 5 GiB sparse file with ~5 KiB of data takes {used} bytes (du)"


def test_sparse_file_uses_little_hub_space(weft):
    weft.require_weft("reads `weft status --json`")
    from weft_harness import find_used_bytes
    before = find_used_bytes(weft.status_any())
    if before is None:
        pytest.skip("weft status --json has no numeric '*used*' key")
    fd = os.open(weft.path / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pwrite_all(fd, os.urandom(8192), 5 * GiB + 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    weft.remount()
    after = find_used_bytes(weft.status_any())
    assert after - before < 64 * MiB, \
        f"space used grew by {after - before} bytes for 8 KiB of data in a sparse file"


@pytest.mark.weft_timeout(900)
def test_concurrent_writers(weft):
    size = WRITER_MIB * MiB
    hashes: dict[str, str] = {}
    errors: list[BaseException] = []

    def writer(i: int):
        try:
            rng = random.Random(1000 + i)
            h = hashlib.sha256()
            fd = os.open(weft.path / f"w{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                remaining = size
                while remaining:
                    # Odd-sized writes so that writes straddle block and chunk boundaries.
                    n = min(remaining, 1 * MiB + 4093)
                    block = rng.randbytes(n)
                    write_all(fd, block)
                    h.update(block)
                    remaining -= n
            finally:
                os.close(fd)
            hashes[f"w{i}"] = h.hexdigest()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise errors[0]
    print(f"{WRITERS} writers x {WRITER_MIB} MiB in {elapsed:.1f}s "
          f"({WRITERS * WRITER_MIB / max(elapsed, 1e-6):.0f} MiB/s)")
    for name, digest in hashes.items():
        assert os.stat(weft.path / name).st_size == size
        assert sha256_file(weft.path / name) == digest, f"{name}: content differs after writing"
    weft.remount()
    for name, digest in hashes.items():
        assert sha256_file(weft.path / name) == digest, f"{name}: content differs after remount"


def _agent_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_hot_blocks_of_many_objects_keep_the_agent_within_its_cache_bound(weft_factory):
    """SPEC §7, What the block cache's bound counts: a reader that reads each file once and
    then keeps reading the first 64 KiB (a header) of every file read so far. Each file's read fetches its whole
    4 MiB object into one slab; the hot header block used to keep that slab, beyond the bound
    the cache counted, and the agent grew by the whole data set. Now hot blocks of mostly
    evicted slabs are copied out and the slabs go."""
    cache_mib, files, size = 16, 100, 4 * MiB
    weft = weft_factory(mount_args=["--cache-mb", cache_mib])
    weft.require_weft("measures the agent's memory")
    d = weft.path / "headers"
    d.mkdir()
    contents = []
    for i in range(files):
        data = random.Random(i).randbytes(size)
        (d / f"f{i}").write_bytes(data)
        contents.append(data)
    weft.remount()
    pid = weft.agent_pid
    assert pid
    baseline = _agent_rss_mib(pid)
    peak = baseline
    fds = [os.open(d / f"f{i}", os.O_RDONLY) for i in range(files)]
    try:
        for i, fd in enumerate(fds):
            assert_same_bytes(pread_exact(fd, size, 0), contents[i], f"f{i}")
            for j in range(i + 1):
                # Past the kernel's page cache, so that the agent serves it.
                os.posix_fadvise(fds[j], 0, 0, os.POSIX_FADV_DONTNEED)
                assert pread_exact(fds[j], 64 * 1024, 0) == contents[j][:64 * 1024], f"header of f{j}"
            peak = max(peak, _agent_rss_mib(pid))
    finally:
        for fd in fds:
            os.close(fd)
    # The cache's bound, the pool's in-flight allowance (64 MiB) and some slack; before the
    # change the agent grew by about the whole 400 MiB read.
    def cache_stats() -> dict:
        stats = weft.cli.weft("cache", "stats", "--json", weft.path)
        assert stats.rc == 0, stats.describe()
        return json.loads(stats.out)["blockCache"]

    # One more pass over the headers alone: each must reach the agent (the page cache was
    # dropped for it), which looks its blocks up (the kernel's read-ahead asks for more than
    # the header, and a miss fetches the rest of the object, so they are not all hits).
    before = cache_stats()
    fds = [os.open(d / f"f{i}", os.O_RDONLY) for i in range(files)]
    try:
        for i, fd in enumerate(fds):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert pread_exact(fd, 64 * 1024, 0) == contents[i][:64 * 1024], f"header of f{i}"
    finally:
        for fd in fds:
            os.close(fd)
    cache = cache_stats()
    looked_up = (cache["hits"] + cache["misses"]) - (before["hits"] + before["misses"])
    assert looked_up >= files, f"the agent served the header reads: {before} -> {cache}"
    assert cache["relocations"] >= files // 2, f"hot headers were moved out of their slabs: {cache}"
    allowed = cache_mib + 64 + 48
    print(f"agent RSS {baseline:.0f} MiB after the remount, at most {peak:.0f} MiB while reading")
    assert peak - baseline <= allowed, \
        f"agent RSS grew {peak - baseline:.0f} MiB (from {baseline:.0f}) reading {files} x 4 MiB " \
        f"with a {cache_mib} MiB cache; allowed {allowed}"
