"""Crash consistency: kill -9 the hub daemon or the agent in the middle of a write workload;
after recovery every fsynced file has exactly its content and fsck is clean.

The workload (crash_writer.py) journals a file only after fsync of the file and of its
directory returned; files replaced by rename may hold either their previous durable content
or the new one when the crash fell between the rename and the directory fsync.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posix_helpers import sha256_file
from weft_harness import pid_alive, tail, wait_until

WRITER = Path(__file__).resolve().parent / "crash_writer.py"
CYCLES = int(os.environ.get("WEFT_CRASH_CYCLES", "2"))
BASE_SEED = int(os.environ.get("WEFT_CRASH_SEED", "7100"))
#: Crash once the workload has made this many files durable (or after CRASH_AFTER_S).
CRASH_AFTER_DURABLE = 12
CRASH_AFTER_S = 20.0
#: Bound for a call on the mount to fail while weftd is down.
HUB_DOWN_ERROR_BOUND_S = 30.0


def _durable_count(journal: Path) -> int:
    try:
        return sum(1 for line in journal.read_text().splitlines() if line.startswith("final "))
    except FileNotFoundError:
        return 0


def _start_writer(res, root: Path, journal: Path, seed: int) -> subprocess.Popen:
    log = open(res.log_dir / f"writer-{seed}.log", "wb")
    proc = subprocess.Popen([sys.executable, str(WRITER), "--root", str(root), "--journal",
                             str(journal), "--seed", str(seed)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    res.running.add(proc)
    return proc


def _stop_writer(res, proc: subprocess.Popen, seconds: float = 20) -> None:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    res.running.discard(proc)


def _run_until_crash(fs, seed: int, crash) -> Path:
    """Starts the workload, lets it make some files durable, then calls crash()."""
    journal = fs.res.base / f"journal-{seed}.txt"
    writer = _start_writer(fs.res, fs.path / f"cycle-{seed}", journal, seed)
    started = time.monotonic()
    while _durable_count(journal) < CRASH_AFTER_DURABLE and time.monotonic() - started < CRASH_AFTER_S:
        if writer.poll() is not None:
            pytest.fail(f"workload stopped before the crash (exit {writer.returncode}):\n"
                        f"{tail(fs.res.log_dir / f'writer-{seed}.log')}")
        time.sleep(0.1)
    assert _durable_count(journal) > 0, f"no file became durable within {CRASH_AFTER_S}s"
    crash()
    _stop_writer(fs.res, writer)
    return journal


def _expected_contents(journal: Path) -> dict[str, set]:
    """NAME -> acceptable sha256 values (None = may be absent)."""
    accepted: dict[str, set] = {}
    last_final: dict[str, str] = {}
    for line in journal.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue                       # a torn last line cannot happen with one write, but be safe
        kind, name, digest = parts
        if kind == "final":
            last_final[name] = digest
            accepted[name] = {digest}
        elif kind == "pending":
            accepted[name] = {last_final.get(name), digest}
    return accepted


def _verify(fs, journals: list[Path]) -> None:
    problems = []
    checked = 0
    for journal in journals:
        root = fs.path / journal.stem.replace("journal-", "cycle-")
        for name, ok in sorted(_expected_contents(journal).items()):
            path = root / name
            try:
                got = sha256_file(path)
            except FileNotFoundError:
                got = None
            except OSError as e:
                problems.append(f"{path}: {e}")
                continue
            checked += 1
            if got not in ok:
                problems.append(f"{path}: sha256 {got} (None = missing), expected one of {sorted(map(str, ok))}")
    assert not problems, f"{len(problems)} of {checked} durable files are wrong after the crash:\n" + \
        "\n".join(problems[:50])


def _probe_error(path: Path) -> tuple[str, float]:
    """Creates a file on the mount in a child process; returns (errno name or OK, seconds)."""
    code = ("import os, errno, sys\n"
            "try:\n"
            f"    fd = os.open({str(path)!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
            "    os.write(fd, b'x'); os.fsync(fd); os.close(fd); print('OK')\n"
            "except OSError as e:\n"
            "    print(errno.errorcode.get(e.errno, e.errno))\n")
    started = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=HUB_DOWN_ERROR_BOUND_S * 2, stdin=subprocess.DEVNULL)
        result = r.stdout.strip() or f"crashed: {r.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        result = "HANG"
    return result, time.monotonic() - started


def _fsck_clean(fs) -> None:
    r = fs.fsck_offline()
    assert r.rc == 0 and not r.timed_out, f"fsck after crash recovery:\n{r.describe()}"


@pytest.mark.weft_timeout(900)
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_kill_weftd_during_writes(weft_factory, compression):
    weft = weft_factory(format_args=["--compression", compression])
    weft.require_weft("kills weftd")
    weft.require_mode("remote")
    journals = []
    for cycle in range(CYCLES):
        seed = BASE_SEED + cycle
        journals.append(_run_until_crash(weft, seed, weft.daemon.kill9))
        # The agent stays up but its hub is gone: calls fail within a bound, never hang.
        result, seconds = _probe_error(weft.path / f"probe-{seed}")
        print(f"cycle {cycle}: with weftd down, create+fsync gave {result} after {seconds:.1f}s")
        assert result in ("EIO", "ETIMEDOUT", "ENOTCONN"), \
            f"while weftd is down a create+fsync on the mount gave {result} after {seconds:.1f}s " \
            f"(expected EIO)"
        assert seconds < HUB_DOWN_ERROR_BOUND_S, f"error took {seconds:.1f}s while weftd was down"
        weft.daemon.start()                        # same directory, same port
        weft.mount_obj.release()                   # weft umount, or fusermount3 -uz
        weft.mount_obj = None
        weft.mount()
        _verify(weft, journals)
    _fsck_clean(weft)
    _verify(weft, journals)


@pytest.mark.weft_timeout(900)
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_kill_agent_during_writes(weft_factory, compression):
    weft = weft_factory(format_args=["--compression", compression])
    weft.require_weft("kills the agent")
    journals = []
    for cycle in range(CYCLES):
        seed = BASE_SEED + 100 + cycle
        killed = []
        journals.append(_run_until_crash(weft, seed, lambda: killed.append(weft.mount_obj.kill_agent())))
        pid = killed[0]
        assert pid, "no agent pid in the pid file"
        assert wait_until(lambda: not pid_alive(pid), 10), "agent survived SIGKILL"
        weft.mount_obj.release()                   # dead FUSE mount: fusermount3 -uz
        weft.mount_obj = None
        weft.mount()
        _verify(weft, journals)
    _fsck_clean(weft)
    _verify(weft, journals)


@pytest.mark.weft_timeout(300)
def test_kill_weftd_after_namespace_changes_loses_none(weft):
    """Strict namespace changes are durable when they return (SPEC.md §6): after kill -9 of
    weftd, its metadata journal (§3.3) gives back every one of them, in order."""
    weft.require_weft("kills weftd")
    weft.require_mode("remote")
    root = weft.path / "ns"
    os.mkdir(root)
    for i in range(300):
        os.close(os.open(root / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o640))
    for i in range(0, 300, 3):
        os.rename(root / f"f{i}", root / f"r{i}")
    for i in range(1, 300, 3):
        os.unlink(root / f"f{i}")
    for i in range(40):
        os.mkdir(root / f"d{i}")
    os.rename(root / "d0", root / "d1" / "inner")
    os.chmod(root / "f2", 0o600)
    os.setxattr(root / "f5", "user.k", b"value")
    os.symlink("f5", root / "link")
    expected = sorted(os.listdir(root))
    inner = os.stat(root / "d1" / "inner").st_ino

    weft.daemon.kill9()
    weft.daemon.start()
    log = weft.daemon.log_path.read_text(errors="replace")
    assert "replayed" in log and "metadata changes from the journal" in log, \
        f"weftd did not replay its journal after kill -9:\n{tail(weft.daemon.log_path)}"
    weft.mount_obj.release()
    weft.mount_obj = None
    weft.mount()

    assert sorted(os.listdir(root)) == expected
    assert os.stat(root / "d1" / "inner").st_ino == inner
    assert os.stat(root / "f2").st_mode & 0o777 == 0o600
    assert os.getxattr(root / "f5", "user.k") == b"value"
    assert os.readlink(root / "link") == "f5"
    _fsck_clean(weft)


@pytest.mark.weft_timeout(300)
def test_kill_weftd_amid_concurrent_namespace_changes_keeps_every_acknowledged_one(weft):
    """Three threads create, rename and unlink in their own directories while weftd is killed
    with -9: every change that returned before the kill is there after the restart (the journal's
    group commit and replay, SPEC.md §3.3); only the change each thread had in flight may go
    either way."""
    import threading
    weft.require_weft("kills weftd")
    weft.require_mode("remote")
    threads_n, kill_after = 3, 900

    def sequence():
        for i in range(100_000):
            yield "create", i
            if i % 5 == 0:
                yield "rename", i
            if i % 7 == 3:
                yield "unlink", i - 3

    def name(i: int) -> str:  # what file i is called after its rename, if it has one
        return f"g{i}" if i % 5 == 0 else f"f{i}"

    def apply(names: set, op: str, i: int) -> None:
        if op == "create":
            names.add(f"f{i}")
        elif op == "rename":
            names.remove(f"f{i}")
            names.add(f"g{i}")
        else:
            names.remove(name(i))

    acked = [[] for _ in range(threads_n)]   # per thread, the changes that returned, in order
    failures = [None] * threads_n

    def work(t: int) -> None:
        d = weft.path / f"t{t}"
        try:
            for op, i in sequence():
                if op == "create":
                    os.close(os.open(d / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                elif op == "rename":
                    os.rename(d / f"f{i}", d / f"g{i}")
                else:
                    os.unlink(d / name(i))
                acked[t].append((op, i))
        except OSError as e:
            failures[t] = e

    for t in range(threads_n):
        os.mkdir(weft.path / f"t{t}")
    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads_n)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while sum(map(len, acked)) < kill_after and time.monotonic() < deadline and all(w.is_alive() for w in workers):
        time.sleep(0.01)
    assert sum(map(len, acked)) >= kill_after, f"the workload made {sum(map(len, acked))} changes, failures {failures}"
    weft.daemon.kill9()
    for w in workers:
        w.join(timeout=60)
    assert all(f is not None for f in failures), "every thread must have seen the hub go"
    weft.daemon.start()
    weft.mount_obj.release()
    weft.mount_obj = None
    weft.mount()

    problems = []
    for t in range(threads_n):
        ops = sequence()
        names: set = set()
        for _ in acked[t]:
            apply(names, *next(ops))
        with_in_flight = set(names)
        apply(with_in_flight, *next(ops))
        got = set(os.listdir(weft.path / f"t{t}"))
        if got != names and got != with_in_flight:
            problems.append(f"t{t} after {len(acked[t])} acknowledged changes: missing "
                            f"{sorted(names - got)[:20]}, unexpected {sorted(got - with_in_flight)[:20]}")
    assert not problems, "\n".join(problems)
    print(f"acknowledged changes per thread: {[len(a) for a in acked]}; failures: {failures}")
    _fsck_clean(weft)
