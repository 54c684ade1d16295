"""Two agents on one weftd: what one writes and closes, the other sees when it opens."""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import re
import resource
import signal
import threading
import time

import pytest

from posix_helpers import read_file, write_file
from weft_harness import find_key


def test_two_agents_share_one_volume(weft):
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    other = weft.add_agent("mnt-b")
    data = os.urandom(3 * 1024 * 1024 + 5)
    write_file(weft.path / "from-a", data)                  # close() publishes it
    assert read_file(other / "from-a") == data
    os.mkdir(other / "dir-from-b")
    write_file(other / "dir-from-b" / "f", b"from b")
    assert read_file(weft.path / "dir-from-b" / "f") == b"from b"
    os.rename(weft.path / "from-a", weft.path / "renamed-by-a")
    assert sorted(os.listdir(other)) == ["dir-from-b", "renamed-by-a"]
    agents = find_key(weft.status(), "connectedAgents")
    count = len(agents) if isinstance(agents, list) else agents
    assert count >= 2, f"connectedAgents is {agents!r} with two agents mounted"


def _wait_for_log(path, pattern: str, after: int, timeout_s: float = 10.0) -> re.Match:
    """The first match of `pattern` in the log at `path` past byte `after`."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(path, "rb") as log:
            log.seek(after)
            found = re.search(pattern, log.read().decode(errors="replace"))
        if found or time.monotonic() > deadline:
            assert found, f"no {pattern!r} in {path} within {timeout_s}s"
            return found
        time.sleep(0.05)


def test_weftd_read_cache_keeps_what_agents_read_and_sigusr1_empties_it(mode, weft_factory):
    """SPEC §4, Hub read cache: with --read-cache-mb, a file another agent reads goes through
    weftd's read cache, which SIGUSR1 empties; every agent reads the same bytes before and after."""
    if mode != "remote":
        pytest.skip("weftd only")
    weft = weft_factory(hub_args=["--read-cache-mb", 64])
    weft.require_weft("reads weftd's log")
    data = os.urandom(8 * 1024 * 1024 + 12345)
    write_file(weft.path / "big", data)
    os.sync()
    # Over TCP: an agent beside weftd would read the store itself (§4, Co-located reads).
    reader = weft.add_agent("mnt-reader", options=["--local-reads", "off"])
    assert read_file(reader / "big") == data
    log = weft.daemon.log_path
    start = os.path.getsize(log)
    os.kill(weft.daemon.proc.pid, signal.SIGUSR1)
    held = int(_wait_for_log(log, r"read cache dropped \((\d+) MiB\)", start).group(1))
    if held == 0 and "direct I/O unavailable" in log.read_text(errors="replace"):
        pytest.skip("the hub's file system refuses O_DIRECT: weftd serves from the page cache")
    # Spans take memory in 256 KiB classes: 8 MiB read in spans of 128 KiB to 4 MiB.
    assert 8 <= held <= 24, f"the cache held {held} MiB after an 8 MiB read"
    assert weft.daemon.alive, "SIGUSR1 does not stop weftd"
    second = weft.add_agent("mnt-second", options=["--local-reads", "off"])
    assert read_file(second / "big") == data, "read again from the disk after the drop"
    start = os.path.getsize(log)
    os.kill(weft.daemon.proc.pid, signal.SIGUSR1)
    _wait_for_log(log, r"read cache dropped \(\d+ MiB\)", start)


def test_weftd_without_a_read_cache_survives_sigusr1(weft):
    """The default weftd has no read cache: SIGUSR1 drops nothing and does not kill it."""
    weft.require_weft("signals weftd")
    weft.require_mode("remote")
    data = os.urandom(2 * 1024 * 1024)
    write_file(weft.path / "f", data)
    log = weft.daemon.log_path
    start = os.path.getsize(log)
    os.kill(weft.daemon.proc.pid, signal.SIGUSR1)
    assert int(_wait_for_log(log, r"read cache dropped \((\d+) MiB\)", start).group(1)) == 0
    assert weft.daemon.alive
    assert read_file(weft.add_agent("mnt-after") / "f") == data


def test_weftd_refuses_a_bad_read_cache_size(weft_cli, resources):
    hub = resources.base / "hub"
    weft_cli.format(hub)
    for bad in ("-1", "1073741825", "lots"):
        result = weft_cli.weftd("serve", hub, "--listen", "127.0.0.1:1", "--read-cache-mb", bad, timeout_s=30)
        assert result.rc not in (0, None), result.describe()
        assert "read-cache-mb" in result.err + result.out, result.describe()


def test_two_agents_changing_one_directory_at_once_never_stall(weft):
    """Both agents hold the directory's lease and change it at the same moment: each change
    recalls the other agent's lease while that agent's kernel holds the directory's lock for
    its own change. Neither may wait for the other (SPEC §12.6, crossed changes)."""
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    release = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    if release < (6, 16):
        # No lock-free way to make the kernel's entries stale: the recall waits for the lock.
        pytest.xfail(f"kernel {platform.release()} < 6.16 has no FUSE_NOTIFY_INC_EPOCH (SPEC.md §12.6)")
    other = weft.add_agent("mnt-b")
    os.mkdir(weft.path / "shared")
    assert os.listdir(other / "shared") == []              # both hold the directory's lease
    assert os.listdir(weft.path / "shared") == []
    rounds = 150
    slowest: dict[str, float] = {}
    failures: list[str] = []
    start = threading.Barrier(2)

    def churn(root, tag: str) -> None:
        directory = root / "shared"
        start.wait()
        worst = 0.0
        for i in range(rounds):
            name = directory / f"{tag}-{i}"
            began = time.monotonic()
            try:
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
                os.unlink(name)
            except OSError as error:
                failures.append(f"{tag} round {i}: {error!r} after {time.monotonic() - began:.1f} s")
                return
            worst = max(worst, time.monotonic() - began)
        slowest[tag] = worst

    threads = [threading.Thread(target=churn, args=(weft.path, "a")),
               threading.Thread(target=churn, args=(other, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    assert set(slowest) == {"a", "b"}, "a churn thread did not finish"
    # A crossing used to wait for the 10 s hub timeout; a healthy create+unlink pair takes
    # milliseconds. 2 s leaves room for a loaded machine.
    assert max(slowest.values()) < 2.0, slowest
    assert os.listdir(weft.path / "shared") == []
    assert os.listdir(other / "shared") == []


def _rename_source_to_target(results: dict, tag: str, root) -> None:
    try:
        os.rename(root / "d" / "source", root / "d" / "target")
        results[tag] = "ok"
    except OSError as error:
        results[tag] = errno.errorcode.get(error.errno, error.errno)


def _trace_count(trace_dir, text: str) -> int:
    """How often `text` occurs in the agents' lease traces in `trace_dir`."""
    return sum(trace.count(text) for trace in
               (path.read_text("utf-8", "replace") for path in trace_dir.glob("weft-*.trace")))


def _lookup_trace(trace_dir) -> str:
    """The lookup lines of the agents' lease traces in `trace_dir`, for a failure message."""
    return "\n".join(line for path in sorted(trace_dir.glob("weft-*.trace"))
                     for line in path.read_text("utf-8", "replace").splitlines() if " lookup " in line)


def _estales_answered(trace_dir) -> int:
    """Lookups the agent answered ESTALE because the kernel might hold another entry of the
    file (its lease trace)."""
    return _trace_count(trace_dir, "ESTALE: inode")


def test_a_rename_across_another_agents_rename_of_the_same_name_fails(weft):
    """rename(2) looks both names up under the directory's lock and returns success without
    asking the file system when they name one file. Agent B's kernel holds the directory's
    lock for its rename(source, target), with `source` looked up, while agent A renames source
    to target: the recall cannot drop B's entries (the lock), and B's lookup of `target` then
    finds the moved file, the one B's kernel holds as `source`. B's rename must fail (ENOENT,
    as on a local file system, whose lock would have ordered the two), not succeed without
    moving anything (SPEC §12.6, "A rename across another agent's rename"). B's lookups of
    `target` are held back 1 s (`WEFT_TEST_LOOKUP_DELAY`) so that A's rename lands while B's
    kernel holds the lock."""
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    release = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    if release < (6, 16):
        # The recall waits for the lock there: A's rename lands after B's, no crossing.
        pytest.skip(f"kernel {platform.release()} < 6.16: recalls wait for the directory's lock (SPEC.md §12.6)")
    trace_dir = weft.res.new_dir("trace-b")
    other = weft.add_agent("mnt-b", env={"WEFT_TEST_LOOKUP_DELAY": "target:1000",
                                         "WEFT_TRACE_DIR": str(trace_dir)})
    os.mkdir(weft.path / "d")
    write_file(weft.path / "d" / "source", b"the file")
    results: dict[str, object] = {}
    for round_ in range(3):
        # B's kernel knows `source` from a lookup (rounds 0 and 2) or from its own rename.
        if round_ == 1:
            os.rename(other / "d" / "target", other / "d" / "source")
        elif round_ == 2:
            os.rename(weft.path / "d" / "target", weft.path / "d" / "source")
        assert os.stat(other / "d" / "source").st_size == 8
        results.clear()
        far = threading.Thread(target=_rename_source_to_target, args=(results, "b", other))
        far.start()
        time.sleep(0.2)                 # B's kernel holds d's lock, looking `target` up
        _rename_source_to_target(results, "a", weft.path)
        far.join(10)
        assert not far.is_alive(), "agent B's rename did not return"
        assert results == {"a": "ok", "b": "ENOENT"}, (round_, results)
        assert sorted(os.listdir(weft.path / "d")) == ["target"]
        assert sorted(os.listdir(other / "d")) == ["target"]
        assert read_file(other / "d" / "target") == b"the file"
        assert _estales_answered(trace_dir) > round_, "B's agent never answered the lookup ESTALE"


def test_a_rename_that_looks_a_name_up_while_another_agents_rename_is_under_way_fails(weft):
    """The other half of the hazard above: agent B's rename looks `source` up at the home while
    agent A's rename of it is under way there (A's rename waits for agent C, which answers
    recalls 600 ms late), so the answer comes uncovered (a notice), and its lookup of `target`
    (held back 900 ms) comes after A's rename applied and finds the same file. B's rename must
    fail with ENOENT, not succeed without moving anything (SPEC §12.6, "A rename across
    another agent's rename")."""
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    trace_dir = weft.res.new_dir("trace-b")
    far = weft.add_agent("mnt-b", env={"WEFT_TEST_LOOKUP_DELAY": "target:900",
                                       "WEFT_TRACE_DIR": str(trace_dir)})
    slow = weft.add_agent("mnt-c", env={"WEFT_TEST_RECALL_DELAY": "600"})
    os.mkdir(weft.path / "d")
    write_file(weft.path / "d" / "source", b"the file")
    results: dict[str, object] = {}
    for round_ in range(3):
        if round_:
            os.rename(weft.path / "d" / "target", weft.path / "d" / "source")
        assert os.stat(slow / "d" / "source").st_size == 8     # C holds a lease on the file
        results.clear()
        near = threading.Thread(target=_rename_source_to_target, args=(results, "a", weft.path))
        near.start()
        time.sleep(0.15)                # A's rename waits for C's answer
        _rename_source_to_target(results, "b", far)
        near.join(10)
        assert not near.is_alive(), "agent A's rename did not return"
        assert results == {"a": "ok", "b": "ENOENT"}, (round_, results)
        assert sorted(os.listdir(far / "d")) == ["target"]
        assert read_file(far / "d" / "target") == b"the file"
        assert _estales_answered(trace_dir) > round_, "B's agent never answered the lookup ESTALE"


@contextlib.contextmanager
def _a_looked_up_uncovered(weft, slow, far, new_name: str, ino: int):
    """Agent B (`far`) looks up d/a while A's create of d/`new_name` waits for agent C (`slow`,
    which answers recalls 600 ms late), so B's entry for the file goes out uncovered; the body
    runs meanwhile, and the create has ended after it."""
    os.listdir(slow / "d")                             # C holds the directory's lease
    change = threading.Thread(target=write_file, args=(weft.path / "d" / new_name, b"x"))
    change.start()
    try:
        time.sleep(0.15)                               # A's create waits for C's answer
        assert os.stat(far / "d" / "a").st_ino == ino  # uncovered: the create is under way
        yield
    finally:
        change.join(10)
    assert not change.is_alive()


def test_a_hard_link_looked_up_during_a_change_costs_a_retry_not_an_error(weft):
    """The check above must not fail calls on a file's legitimate second name: agent B looks
    up `a` while A's change of the directory is under way (C answers recalls 600 ms late), so
    the answer goes out uncovered; B's `stat` of `b`, a hard link of the same file, then finds
    the file under another entry than B last gave out. The lookup answers ESTALE once (the
    kernel may hold `a` across it), the kernel retries, and `stat` succeeds (SPEC §12.6, "A
    rename across another agent's rename")."""
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    trace_dir = weft.res.new_dir("trace-b")
    far = weft.add_agent("mnt-b", env={"WEFT_TRACE_DIR": str(trace_dir)})
    slow = weft.add_agent("mnt-c", env={"WEFT_TEST_RECALL_DELAY": "600"})
    os.mkdir(weft.path / "d")
    write_file(weft.path / "d" / "a", b"one file, two names")
    os.link(weft.path / "d" / "a", weft.path / "d" / "b")
    ino = os.stat(weft.path / "d" / "a").st_ino
    for round_ in range(3):
        with _a_looked_up_uncovered(weft, slow, far, f"new-{round_}", ino):
            assert os.stat(far / "d" / "b").st_ino == ino  # the other name: a retry, no error
    answered = _estales_answered(trace_dir)
    assert 1 <= answered <= 6, f"{answered} ESTALE answers for 3 stats of a second name"


def test_the_kernels_retry_of_a_lookup_answered_estale_is_not_answered_estale_again(weft):
    """After ESTALE the kernel starts the call again once with every name looked up at the file
    system (LOOKUP_REVAL), so the entry that may be stale cannot be used by that call, and a
    second ESTALE would reach the caller. Agent B looks up `a` while A's change of the
    directory is under way (C answers recalls 600 ms late), so that entry goes out uncovered;
    B's rename of `b`, a hard link of the same file, then finds the file under another entry and
    answers ESTALE while the drop of `a` waits (its thread held back 300 ms by
    WEFT_TEST_ENTRY_DROP_DELAY, as a scheduler may run it after the retry took the directory's
    lock back: the two-hub linearizability test saw a rename fail so, seed 1000, 2026-12-07).
    The rename must succeed after one ESTALE (SPEC §12.6, "The kernel's retry")."""
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    trace_dir = weft.res.new_dir("trace-b")
    far = weft.add_agent("mnt-b", env={"WEFT_TRACE_DIR": str(trace_dir), "WEFT_TEST_ENTRY_DROP_DELAY": "300"})
    slow = weft.add_agent("mnt-c", env={"WEFT_TEST_RECALL_DELAY": "600"})
    os.mkdir(weft.path / "d")
    write_file(weft.path / "d" / "a", b"one file, two names")
    ino = os.stat(weft.path / "d" / "a").st_ino
    for round_ in range(3):
        time.sleep(1.1)     # B's entries of the last round are no longer "uncovered a moment ago"
        os.link(weft.path / "d" / "a", weft.path / "d" / "b")
        with _a_looked_up_uncovered(weft, slow, far, f"new-{round_}", ino):
            os.rename(far / "d" / "b", far / "d" / f"c-{round_}")   # ESTALE once, then the retry
        assert os.stat(far / "d" / f"c-{round_}").st_ino == ino
        assert sorted(os.listdir(weft.path / "d")) == sorted(
            ["a"] + [f"c-{n}" for n in range(round_ + 1)] + [f"new-{n}" for n in range(round_ + 1)])
        # Counted for the rename's lookups of `b` only: the stat of c-N above may find the drop
        # of `a` still waiting too (it ends about when A's create does, on a loaded machine
        # after the stat's lookup), and costs a retry of its own (SPEC §12.6).
        trace = _lookup_trace(trace_dir)
        assert _trace_count(trace_dir, "name=b ESTALE: inode") == round_ + 1, trace
        # The retry came while the drop of `a` was still waiting: answering it ESTALE again
        # would have failed the rename.
        retries = [line for line in trace.splitlines()
                   if f"name=b inode {ino} answered in the kernel's retry after ESTALE" in line]
        assert len(retries) == round_ + 1, trace
        assert all(line.endswith("(its drop still waiting)") for line in retries), trace


# struct vfs_cap_data, revision 2, effective, CAP_NET_RAW permitted (include/uapi/linux/capability.h)
FILE_CAPS = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


def test_a_write_drops_file_capabilities_another_agent_set(weft):
    """Before every write(2) the kernel asks for security.capability, and removes it if the file
    has one. The agent answers that from what it read under the file's lease (SPEC §12.6,
    security attributes): capabilities another agent sets recall the lease, so the writer's
    next write still finds and drops them."""
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    other = weft.add_agent("mnt-b")
    path = weft.path / "capable"
    with open(path, "wb") as handle:
        handle.write(b"first")                              # kept: no capabilities
        handle.flush()
        os.setxattr(other / "capable", "security.capability", FILE_CAPS)
        assert os.getxattr(path, "security.capability") == FILE_CAPS
        handle.write(b" second")
        handle.flush()
    for view in (path, other / "capable"):
        with pytest.raises(OSError) as raised:
            os.getxattr(view, "security.capability")
        assert raised.value.errno == errno.ENODATA, view
    assert read_file(other / "capable") == b"first second"
    # The agent's own setxattr is seen by its own next write the same way.
    with open(path, "r+b") as handle:
        os.setxattr(path, "security.capability", FILE_CAPS)
        handle.write(b"F")
        handle.flush()
    with pytest.raises(OSError) as raised:
        os.getxattr(other / "capable", "security.capability")
    assert raised.value.errno == errno.ENODATA


def test_a_name_another_agent_keeps_replacing_never_goes_missing(weft):
    """One agent replaces `target` again and again (create `next`, rename it over `target`);
    `target` exists all along, so the other agent's `stat` and `open` of it must never fail
    with ENOENT. Between its lookup of the name and its GETATTR or OPEN of the inode found, that
    inode may be gone: the agent answers ESTALE and the kernel looks the path up again
    (SPEC §12.6, an inode gone under a name). The kernel does so once: when the name is
    replaced again during that second look, ESTALE reaches the caller (as on NFS); that must
    stay rare. (Before: 5 ENOENTs in 13,421 checks; after: 1 ESTALE in 64,003.)"""
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    other = weft.add_agent("mnt-b")
    os.mkdir(weft.path / "swap")
    write_file(weft.path / "swap" / "target", b"0")
    assert read_file(other / "swap" / "target") == b"0"
    stop = threading.Event()
    replaced = [0]
    failures: list[str] = []

    def replace() -> None:
        directory = weft.path / "swap"
        while not stop.is_set() and replaced[0] < 3000:
            write_file(directory / "next", str(replaced[0]).encode())
            os.rename(directory / "next", directory / "target")
            replaced[0] += 1
        stop.set()

    writer = threading.Thread(target=replace)
    writer.start()
    checks = 0
    stale = 0
    deadline = time.monotonic() + 30
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            path = other / "swap" / "target"
            try:
                os.stat(path)
                os.close(os.open(path, os.O_RDONLY))
            except OSError as error:
                if error.errno == errno.ESTALE:
                    stale += 1
                else:
                    failures.append(f"check {checks} (after {replaced[0]} replacements): {error!r}")
                    if len(failures) >= 5:
                        break
            checks += 1
            if checks % 64 == 0:
                time.sleep(0.001)   # let the replacing agent run too (2 CPUs)
    finally:
        stop.set()
        writer.join(60)
    assert not failures, failures
    assert replaced[0] >= 100 and checks >= 1000, f"too little overlap: {replaced[0]} replacements, {checks} checks"
    assert stale <= checks // 1000, f"{stale} ESTALE in {checks} checks"


def _open_file_limits(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def test_weftd_and_the_agent_raise_their_open_file_limit(mode, weft_factory):
    """Each may hold two descriptors per open object (SPEC §4, Hub read cache): both raise the
    soft limit of open files to the hard one at start. They are started with a soft limit of
    1,024, as a systemd service or a login shell often has."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"the hard limit of open files ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        weft = weft_factory()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    weft.require_weft("reads the processes' limits")
    pids = [weft.agent_pid] + ([weft.daemon.proc.pid] if weft.daemon else [])
    assert all(pids), pids
    for pid in pids:
        assert _open_file_limits(pid) == (str(hard), str(hard)), f"pid {pid}"
