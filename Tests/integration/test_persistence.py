"""Durability and integrity: data and metadata survive unmount/remount, unlinked-but-open
files, space reclaim, and detection of a corrupted chunk on the hub."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import stat
import time
from pathlib import Path

import pytest

from posix_helpers import (MiB, assert_errno, pread_exact, pwrite_all, read_file, sha256_bytes, sha256_file,
                           utimensat, write_all, write_file)
from weft_harness import find_key, find_used_bytes

ROCKSDB_NAME_PREFIXES = ("MANIFEST", "CURRENT", "LOCK", "OPTIONS", "IDENTITY", "LOG")
ROCKSDB_SUFFIXES = (".sst", ".log", ".blob", ".dbtmp")


def snapshot(root: Path) -> dict:
    """Everything observable about a tree through stat/readlink/read/xattrs, by relative path."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames) + ([] if dirpath != str(root) else ["."]):
            full = os.path.join(dirpath, name) if name != "." else str(root)
            st = os.lstat(full)
            entry = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
                     "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
                     "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                entry["sha256"] = sha256_file(full)
            if stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(full)
                entry["size"] = st.st_size
            else:
                entry["xattrs"] = {k: os.getxattr(full, k).hex() for k in sorted(os.listxattr(full))}
            result[os.path.relpath(full, root)] = entry
    return result


def diff_snapshots(before: dict, after: dict) -> list[str]:
    problems = []
    for path in sorted(set(before) | set(after)):
        if path not in after:
            problems.append(f"{path}: missing after remount")
        elif path not in before:
            problems.append(f"{path}: appeared after remount")
        else:
            for key in sorted(set(before[path]) | set(after[path])):
                if before[path].get(key) != after[path].get(key):
                    problems.append(f"{path}: {key} was {before[path].get(key)!r}, "
                                    f"now {after[path].get(key)!r}")
    return problems


def test_data_survives_remount(weft):
    root = weft.path
    chunk = weft.chunk_size
    rng = random.Random(11)
    write_file(root / "empty", b"")
    write_file(root / "one-byte", b"\x7f")
    write_file(root / "big", rng.randbytes(4 * chunk + 12345))
    write_file(root / "medium", rng.randbytes(100_000))
    os.makedirs(root / "a" / "b" / "c")
    write_file(root / "a" / "b" / "c" / "deep", b"deep data")
    fd = os.open(root / "a" / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    pwrite_all(fd, b"after the hole", chunk + 100)
    os.close(fd)
    os.symlink("b/c/deep", root / "a" / "link")
    os.link(root / "medium", root / "a" / "hardlink")
    os.setxattr(root / "medium", "user.k", b"xattr value")
    os.setxattr(root / "a", "user.dir", b"\x00\x01")
    os.chmod(root / "one-byte", 0o640)
    os.chown(root / "one-byte", 1234, 5678)
    os.chmod(root / "a" / "b", 0o2750)
    utimensat(root / "empty", 1_000_000_000_123_456_789, 1_100_000_000_987_654_321)
    os.mkdir(root / "empty-dir")

    before = snapshot(root)
    weft.remount()
    after = snapshot(root)
    problems = diff_snapshots(before, after)
    assert not problems, "changed across unmount/remount:\n" + "\n".join(problems)
    # And it is still writable afterwards.
    write_file(root / "after", b"written after remount")
    weft.remount()
    assert sha256_file(root / "after") == sha256_bytes(b"written after remount")
    assert sha256_file(root / "big") == before["big"]["sha256"]


def test_uploads_to_a_zstd_volume_are_compressed_by_the_agent_or_by_the_hub(weft_factory):
    """Over weftd, an agent on a zstd volume compresses what it uploads (SPEC.md §4, "Compressed
    uploads"); with `--upload-compression hub` it sends raw bytes and weftd compresses them.
    Both agents here send over TCP (`--local-writes off`; the default agent beside weftd
    writes compressed objects into its store itself, §4 Co-located writes). Either way the
    other mounts read every byte back, the volume stores less than the files hold, fsck is
    clean, and each agent's last log line says what it compressed."""
    weft = weft_factory(format_args=["--compression", "zstd", "--chunk-size", 1 << 20])
    weft.require_weft("checks Weft's own upload compression")
    weft.require_mode("remote")
    agent_sender = weft.add_agent("mnt-agent-compresses", options=["--local-writes", "off"])
    raw_sender = weft.add_agent("mnt-hub-compresses", options=["--upload-compression", "hub", "--local-writes", "off"])
    text = b"".join(b"line %08d of a log that repeats itself\n" % i for i in range(60_000))[:2 * (1 << 20) + 4321]
    write_file(agent_sender / "by-agent", text)
    write_file(raw_sender / "by-hub", text[::-1])
    write_file(weft.path / "by-store", text[1:])
    assert read_file(raw_sender / "by-agent") == text
    assert read_file(weft.path / "by-hub") == text[::-1]
    assert read_file(agent_sender / "by-store") == text[1:]
    status = weft.status()
    assert status["spaceUsedBytes"] < len(text), status
    for mount in weft.extra_mounts:
        result = mount.umount()
        assert result.rc == 0, result.describe()
    logs = {name: mount.log_file.read_text("utf-8", "replace") for name, mount in
            (("agent", weft.extra_mounts[0]), ("hub", weft.extra_mounts[1]))}
    sent = {name: re.findall(r"uploads compressed by this agent: (\d+) object\(s\), (\d+) bytes sent as (\d+) "
                             r"\(upload compression: (\w+)\)", text_) for name, text_ in logs.items()}
    assert len(sent["agent"]) == 1 and len(sent["hub"]) == 1, sent
    objects, raw, image, mode = sent["agent"][0]
    assert mode == "agent" and int(objects) >= 3 and int(raw) >= len(text) and int(image) < int(raw) // 4, sent
    assert sent["hub"][0] == ("0", "0", "0", "hub"), sent
    weft.remount()
    assert read_file(weft.path / "by-hub") == text[::-1]
    assert read_file(weft.path / "by-store") == text[1:]
    r = weft.fsck()
    assert r.rc == 0, r.describe()


def test_zstd_volume_keeps_every_byte_and_stores_less(weft_factory):
    """A volume formatted with zstd: files whose blocks compress, do not, or alternate (a
    compressed object's raw blocks are copied into its image, SPEC.md §3.1), with holes and
    small overwrites across chunk boundaries, read back the same after a remount and take less
    space than their bytes; fsck is clean."""
    chunk = 1 << 20
    weft = weft_factory(format_args=["--compression", "zstd", "--chunk-size", chunk])
    weft.require_weft("checks Weft's own compression")
    root = weft.path
    rng = random.Random(23)
    block = 65536
    text = b"".join(b"line %08d of a log that repeats itself\n" % i for i in range(80_000))
    files = {
        "text": text[:3 * chunk + 12345],
        "random": rng.randbytes(2 * chunk + 777),
        "mixed": b"".join((bytes([i % 251]) * block) if i % 2 == 0 else rng.randbytes(block)
                          for i in range(40)) + b"tail",
    }
    for name, data in files.items():
        write_file(root / name, data)
    # Small overwrites in the middle and across a chunk boundary, and a hole, all fsynced.
    expected = dict(files)
    fd = os.open(root / "text", os.O_RDWR)
    for offset, patch in ((5, b"PATCH"), (chunk - 3, b"across-the-boundary"), (2 * chunk + 70_000, rng.randbytes(9000))):
        pwrite_all(fd, patch, offset)
        data = bytearray(expected["text"])
        data[offset:offset + len(patch)] = patch
        expected["text"] = bytes(data)
    os.fsync(fd)
    os.close(fd)
    fd = os.open(root / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    pwrite_all(fd, text[:200_000], chunk + 4096)
    os.fsync(fd)
    os.close(fd)
    expected["sparse"] = bytes(chunk + 4096) + text[:200_000]

    weft.remount()
    for name, data in expected.items():
        assert (root / name).stat().st_size == len(data), name
        assert sha256_file(root / name) == sha256_bytes(data), f"{name} changed across a remount"
        with open(root / name, "rb") as f:
            f.seek(len(data) // 2 - 1000)
            assert f.read(70_000) == data[len(data) // 2 - 1000:len(data) // 2 + 69_000], f"{name}: a middle range"
    used = find_used_bytes(weft.status())
    raw = sum(len(d) for d in expected.values())
    assert used is not None and used < raw - 2 * chunk, f"zstd volume uses {used} bytes for {raw} bytes of files"
    r = weft.fsck_offline()
    assert r.rc == 0, f"fsck not clean on a zstd volume:\n{r.describe()}"


def _chunk_count(status: dict) -> int:
    value = find_key(status, "chunks")
    if isinstance(value, dict):
        for key in ("count", "total", "number", "chunks"):
            if isinstance(value.get(key), int):
                return value[key]
    assert isinstance(value, int), f"weft status --json has no integer 'chunks': {status}"
    return value


def test_unlink_while_open(weft):
    chunk = weft.chunk_size
    data = bytearray(random.Random(21).randbytes(3 * chunk + 1000))
    p = weft.path / "victim"

    chunks_before = _chunk_count(weft.status_any()) if weft.is_weft else None

    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    fd2 = None
    try:
        write_all(fd, bytes(data))
        os.fsync(fd)
        chunks_with_file = None
        if weft.is_weft:
            r = weft.cli.weft("status", weft.source, "--json")
            if r.rc == 0:
                chunks_with_file = _chunk_count(json.loads(r.out))
                assert chunks_with_file > chunks_before, \
                    f"chunk count did not grow ({chunks_before} -> {chunks_with_file}) after " \
                    f"writing and fsyncing {len(data)} bytes"
        fd2 = os.open(p, os.O_RDONLY)
        os.unlink(p)
        assert_errno(errno.ENOENT, os.stat, p)
        assert "victim" not in os.listdir(weft.path)
        assert os.fstat(fd).st_nlink == 0
        assert pread_exact(fd, len(data), 0) == bytes(data), "unlinked file no longer readable"
        patch = b"written after unlink"
        pwrite_all(fd, patch, chunk - 5)
        data[chunk - 5:chunk - 5 + len(patch)] = patch
        pwrite_all(fd, b"grown", len(data))
        data += b"grown"
        os.fsync(fd)
        assert os.fstat(fd).st_size == len(data)
        assert pread_exact(fd, len(data), 0) == bytes(data)
        assert pread_exact(fd2, len(data), 0) == bytes(data), "second fd sees other data"
        # A new file under the same name is a different file.
        write_file(p, b"new file")
        assert pread_exact(fd, 8, 0) == bytes(data[:8])
    finally:
        os.close(fd)
        if fd2 is not None:
            os.close(fd2)
    assert open(p, "rb").read() == b"new file"
    os.unlink(p)

    if not weft.is_weft:
        return
    deadline = time.monotonic() + 60
    while True:
        now = _chunk_count(weft.status_any())
        if now <= chunks_before:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"space of the unlinked file not reclaimed 60 s after its last close: "
                        f"{chunks_before} chunks before, {chunks_with_file} with the file, "
                        f"{now} now")
        time.sleep(1)
    r = weft.fsck_offline()
    assert r.rc == 0, f"fsck not clean after unlink-while-open:\n{r.describe()}"


def _hub_data_files(hub_dir: Path) -> list[tuple[int, Path]]:
    files = []
    for dirpath, _, filenames in os.walk(hub_dir):
        for name in filenames:
            if name.startswith(ROCKSDB_NAME_PREFIXES) or name.endswith(ROCKSDB_SUFFIXES):
                continue
            full = Path(dirpath) / name
            files.append((full.stat().st_size, full))
    return sorted(files, reverse=True)


def _largest_chunk_file(weft, min_bytes: int = 1 * MiB) -> Path:
    files = _hub_data_files(weft.hub_dir)
    assert files and files[0][0] >= min_bytes, (
        f"no chunk file of at least {min_bytes} bytes in {weft.hub_dir}; non-RocksDB files: "
        f"{[(str(p.relative_to(weft.hub_dir)), s) for s, p in files[:10]]}")
    return files[0][1]


def _corrupt_largest_chunk_file(weft, min_bytes: int) -> Path:
    victim = _largest_chunk_file(weft, min_bytes)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    return victim


def _read_in_blocks(path: Path, expected: bytes, block: int = 64 * 1024) -> list[int]:
    """Reads every block; returns offsets that failed with EIO. Fails on any other error
    and on any block that reads back different bytes."""
    eio_offsets = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, len(expected), block):
            try:
                got = pread_exact(fd, block, offset)
            except OSError as e:
                assert e.errno == errno.EIO, \
                    f"reading corrupted data at {offset}: expected EIO, got {errno.errorcode.get(e.errno)}"
                eio_offsets.append(offset)
                continue
            assert got == expected[offset:offset + block], \
                f"WRONG BYTES returned at offset {offset} of a file with a corrupted chunk"
    finally:
        os.close(fd)
    return eio_offsets


def test_corrupted_chunk_gives_eio_and_fsck_reports_it(weft):
    weft.require_weft("corrupts a chunk file of the hub")
    data = random.Random(31).randbytes(3 * MiB)
    p = weft.path / "precious"
    write_file(p, data, fsync=True)
    with weft.offline():
        victim = _corrupt_largest_chunk_file(weft, 1 * MiB)
    eio = _read_in_blocks(p, data)
    assert eio, (f"flipped a byte in the middle of {victim} but every read of {p} returned the "
                 "right data: the corruption went unnoticed (no checksum on read?)")
    # A second pass gives the same answer (no caching of bad data).
    assert _read_in_blocks(p, data) == eio
    r = weft.fsck_offline()
    assert r.rc != 0, f"fsck exited 0 on a volume with a corrupted chunk ({victim}):\n{r.describe()}"
    assert not r.timed_out


def test_fsck_repair_after_corruption(weft):
    weft.require_weft("corrupts a chunk file of the hub")
    data = random.Random(32).randbytes(2 * MiB)
    write_file(weft.path / "damaged", data, fsync=True)
    write_file(weft.path / "intact", b"unrelated small file", fsync=True)
    with weft.offline():
        _corrupt_largest_chunk_file(weft, 1 * MiB)
        first = weft.fsck(source=str(weft.hub_dir))
        assert first.rc != 0, f"fsck missed the corruption:\n{first.describe()}"
        repair = weft.fsck("--repair", source=str(weft.hub_dir))
        assert not repair.timed_out, repair.describe()
        again = weft.fsck(source=str(weft.hub_dir))
        assert again.rc == 0, (f"fsck still finds problems after --repair:\n{repair.describe()}\n"
                               f"{again.describe()}")
    assert open(weft.path / "intact", "rb").read() == b"unrelated small file"


def test_fsck_repair_keeps_an_object_it_cannot_open_and_exits_1(weft):
    """An object fsck cannot open (EACCES: a mode-000 file, checked by a root without
    CAP_DAC_OVERRIDE) is not damage: --repair keeps it and its references, says it is not
    repaired, and exits 1. Before, open errors counted as damage and --repair deleted the
    intact object, and --repair always exited 0."""
    weft.require_weft("makes a chunk file of the hub unreadable")
    data = random.Random(33).randbytes(3 * MiB)
    write_file(weft.path / "kept", data, fsync=True)
    with weft.offline():
        victim = _largest_chunk_file(weft)
        mode = victim.stat().st_mode
        os.chmod(victim, 0)
        try:
            r = weft.cli.res.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                                  weft.cli.weft_path, "fsck", str(weft.hub_dir), "--repair", "--json"],
                                 timeout_s=600)
        finally:
            os.chmod(victim, mode)
        assert r.rc == 1 and not r.timed_out, f"fsck --repair left a problem but exited {r.rc}:\n{r.describe()}"
        report = json.loads(r.out)
        assert report["repaired"] == [], r.describe()
        assert len(report["remaining"]) == 1 and "could not be checked" in report["remaining"][0] \
            and "Permission denied" in report["remaining"][0], r.describe()
        assert victim.exists(), f"fsck --repair deleted {victim}, an intact object it could not open"
        again = weft.fsck(source=str(weft.hub_dir))
        assert again.rc == 0, f"with the file readable again:\n{again.describe()}"
    assert open(weft.path / "kept", "rb").read() == data


def test_fsck_finds_an_object_whose_file_is_a_directory_missing(weft):
    weft.require_weft("puts a directory in place of a chunk file")
    write_file(weft.path / "lost", random.Random(34).randbytes(2 * MiB), fsync=True)
    with weft.offline():
        victim = _largest_chunk_file(weft)
        victim.unlink()
        victim.mkdir()
        first = weft.fsck(source=str(weft.hub_dir))
        assert first.rc == 1 and "is referenced but missing" in first.out, \
            f"a directory in place of {victim} went unnoticed:\n{first.describe()}"
        repair = weft.fsck("--repair", source=str(weft.hub_dir))
        assert repair.rc == 0, f"every problem was repaired:\n{repair.describe()}"
        assert "0 not repaired" in repair.out, repair.describe()
    assert os.stat(weft.path / "lost").st_size == 2 * MiB
    assert open(weft.path / "lost", "rb").read(4096) == bytes(4096), "the dropped range reads as zeros"


def test_fsck_json_on_clean_volume(weft):
    weft.require_weft("runs weft fsck")
    write_file(weft.path / "f", b"x" * 100_000, fsync=True)
    os.mkdir(weft.path / "d")
    r = weft.fsck_offline("--json")
    assert r.rc == 0, f"fsck of a clean volume:\n{r.describe()}"
    json.loads(r.out)
