"""Randomized concurrent operations from several agents in two hubs, recorded and checked for
linearizability (SPEC.md §12.9). The seed and the failing object's history are printed on
failure; WEFT_LIN_SEED replays one seed, WEFT_SLOW=1 runs the long version."""

from __future__ import annotations

import errno
import os
import random
import re
import threading
import time
from pathlib import Path

import pytest

import weft_harness as harness
from linearizability import Op, check
from test_cluster import Cluster

BLOCK = 4096
BLOCKS = 4
DATA_FILES = ["f0", "f1"]
NAMES = ["n0", "n1", "n2"]


def token_bytes(token: str) -> bytes:
    raw = (token + "|").encode()
    return (raw * (BLOCK // len(raw) + 1))[:BLOCK]


def decode(data: bytes):
    if len(data) < BLOCK or not any(data):
        return None
    return data.split(b"|", 1)[0].decode()


class Agent(threading.Thread):
    """One agent's client: runs `count` random operations on its mount, one at a time."""

    def __init__(self, number: int, root, seed: int, count: int, history: list, lock: threading.Lock):
        super().__init__(name=f"agent-{number}", daemon=True)
        self.number, self.root, self.count = number, root, count
        self.rng = random.Random(seed * 1000 + number)
        self.history, self.lock = history, lock
        self.failure = None
        # Cleared while this agent's process is being restarted: the client waits, like a
        # process whose file system went away and came back.
        self.gate = threading.Event()
        self.gate.set()
        self.idle = threading.Event()
        # Cleared by a fault injector until it has injected every kind of fault: the client
        # holds its last operation back meanwhile, so a fast run cannot end before them.
        self.hold = threading.Event()
        self.hold.set()
        # Files this agent keeps open across operations: a write() on them returns before any
        # close, so another agent's read must still see it (leases with recall, SPEC.md §12.6).
        self.open_files: dict[str, int] = {}

    def held(self, path) -> int:
        fd = self.open_files.get(path.name)
        if fd is None:
            fd = os.open(path, os.O_RDWR)
            self.open_files[path.name] = fd
        return fd

    def drop_held(self):
        for fd in self.open_files.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.open_files.clear()

    def record(self, obj, name, args, call, via=""):
        invoke = time.monotonic_ns()
        result, error = None, None
        try:
            result = call()
        except OSError as e:
            error = e.errno
        complete = time.monotonic_ns()
        with self.lock:
            self.history.append(Op(self.number, obj, name, tuple(args), invoke, complete, result, error, via=via))

    def run(self):
        try:
            for seq in range(self.count):
                while True:
                    if not self.gate.is_set():
                        self.idle.set()
                        self.gate.wait()
                        self.idle.clear()
                        self.drop_held()  # its agent was restarted: those descriptors are dead
                    if seq < self.count - 1 or self.hold.wait(0.1):
                        break
                self.step(seq)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.failure = e
        finally:
            self.drop_held()

    def step(self, seq: int):
        rng = self.rng
        data = self.root / "data"
        ns = self.root / "ns"
        kind = rng.random()
        if kind < 0.6:
            name = rng.choice(DATA_FILES)
            path = data / name
            block = rng.randrange(BLOCKS)
            choice = rng.random()
            if choice < 0.25:
                token = f"a{self.number}s{seq}"

                def write():
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.pwrite(fd, token_bytes(token), block * BLOCK)
                    finally:
                        os.close(fd)
                self.record(f"file:{name}", "write", (block, token), write, via="open+close")
            elif choice < 0.45:
                token = f"a{self.number}s{seq}h"
                # write() on a descriptor kept open: no close, no fsync.
                self.record(f"file:{name}", "write", (block, token),
                            lambda: os.pwrite(self.held(path), token_bytes(token), block * BLOCK) and None,
                            via="kept-open fd")
            elif choice < 0.6:
                # read() on a descriptor kept open (its pages may be cached).
                self.record(f"file:{name}", "read", (block,),
                            lambda: decode(os.pread(self.held(path), BLOCK, block * BLOCK)), via="kept-open fd")
            elif choice < 0.9:
                def read():
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        return decode(os.pread(fd, BLOCK, block * BLOCK))
                    finally:
                        os.close(fd)
                self.record(f"file:{name}", "read", (block,), read, via="open+close")
            else:
                self.record(f"file:{name}", "stat", (), lambda: os.stat(path).st_size)
        else:
            choice = rng.random()
            a, b = rng.choice(NAMES), rng.choice(NAMES)
            if choice < 0.25:
                def create():
                    os.close(os.open(ns / a, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                self.record("ns:ns", "create", (a,), create)
            elif choice < 0.45:
                self.record("ns:ns", "unlink", (a,), lambda: os.unlink(ns / a))
            elif choice < 0.6 and a != b:
                self.record("ns:ns", "rename", (a, b), lambda: os.rename(ns / a, ns / b))
            elif choice < 0.85:
                self.record("ns:ns", "exists", (a,), lambda: os.stat(ns / a) and None)
            else:
                self.record("ns:ns", "list", (), lambda: tuple(sorted(os.listdir(ns))))


def run_history(resources, seed: int, ops_per_agent: int, rtt_ms: int, mount_options=(), faults=None, env=None):
    cluster = Cluster(resources, hubs=2, rtt_ms=rtt_ms, env=env)
    try:
        cluster.weft_json("volume", "create", f"weft://{cluster.address('hub1')}", "lin", "--home", "hub1")
        cli = harness.WeftCLI(resources)
        # Two agents in hub1's region, one in hub2's (its metadata crosses the emulated WAN).
        sources = [f"weft://{cluster.address('hub1')}/lin", f"weft://{cluster.address('hub1')}/lin",
                   f"weft://{cluster.address('hub2')}/lin"]
        mounts = []
        for index, source in enumerate(sources):
            m = harness.Mount(resources, cli, source, resources.new_dir(f"agent{index}-{seed}"), options=mount_options)
            m.start()
            mounts.append(m)
        root = mounts[0].mountpoint
        (root / "data").mkdir()
        (root / "ns").mkdir()
        assert all(os.path.isdir(m.mountpoint / "data") for m in mounts)
        for name in DATA_FILES:
            (root / "data" / name).touch()
        history: list[Op] = []
        lock = threading.Lock()
        agents = [Agent(i, m.mountpoint, seed, ops_per_agent, history, lock) for i, m in enumerate(mounts)]
        for agent in agents:
            agent.start()
        stop_faults = threading.Event()
        fault_thread = None
        fault_errors = []
        if faults:
            def run_faults():
                try:
                    faults(cluster, stop_faults, mounts, agents)
                except BaseException as e:  # noqa: BLE001 - reported below
                    fault_errors.append(e)
                finally:
                    for agent in agents:
                        agent.hold.set()   # never leave a client waiting on a dead injector
            fault_thread = threading.Thread(target=run_faults, daemon=True)
            fault_thread.start()
        for agent in agents:
            agent.join(timeout=600)
        stop_faults.set()
        if fault_thread:
            fault_thread.join(timeout=60)
        assert not fault_errors, f"seed {seed}: the fault injector failed: {fault_errors[0]!r}"
        for agent in agents:
            assert not agent.is_alive(), f"{agent.name} did not finish"
            assert agent.failure is None, f"seed {seed}: {agent.name} crashed: {agent.failure!r}"
        return history
    finally:
        for m in list(resources.mounts):
            if m.active:
                harness.WeftCLI(resources).weft("umount", m.mountpoint, timeout_s=60)
        cluster.down()


def seeds(default_count: int) -> list[int]:
    if os.environ.get("WEFT_LIN_SEED"):
        return [int(os.environ["WEFT_LIN_SEED"])]
    count = 20 if os.environ.get("WEFT_SLOW") == "1" else default_count
    base = int(os.environ.get("WEFT_LIN_BASE_SEED", "1000"))
    return [base + i for i in range(count)]


@pytest.fixture
def trace_dir(resources, monkeypatch) -> Path:
    """Every weft and weftd process the test starts notes its lease events here (SPEC.md §12.6,
    "Trace"), so that a failure's report can quote what the agents and homes did around it:
    the failures these tests catch are rare races, and a CI run keeps only its output."""
    path = Path(os.environ.get("WEFT_TRACE_DIR") or resources.new_dir("trace"))
    monkeypatch.setenv("WEFT_TRACE_DIR", str(path))
    return path


def trace_excerpt(trace_dir: Path, verdict, before_ms: float = 60, after_ms: float = 20, max_lines: int = 800) -> str:
    """The trace lines of every process from `before_ms` before the first operation the checker
    could not place (the earliest to complete of those outside the longest linearizable prefix)
    to `after_ms` after it, on the report's clock (ms from its origin)."""
    placed = {id(op) for op in verdict.longest_prefix}
    unplaced = [op for op in verdict.history if id(op) not in placed and not op.indeterminate]
    if not unplaced:
        return ""
    stuck = min(unplaced, key=lambda op: op.complete)
    origin = min(op.invoke for op in verdict.history)
    start, end = stuck.invoke - before_ms * 1e6, stuck.complete + after_ms * 1e6
    lines = []
    for path in sorted(trace_dir.glob("*.trace")):
        for line in path.read_text(errors="replace").splitlines():
            stamp, _, rest = line.partition(" ")
            if stamp.isdigit() and start <= int(stamp) <= end:
                lines.append((int(stamp), f"{(int(stamp) - origin) / 1e6:9.3f} {path.stem} {rest}"))
    lines.sort()
    shown = [text for _, text in lines[:max_lines]]
    more = f"\n  ... {len(lines) - max_lines} more" if len(lines) > max_lines else ""
    return (f"lease trace from {(start - origin) / 1e6:.1f} to {(end - origin) / 1e6:.1f} ms ({len(lines)} lines, "
            f"{trace_dir}):\n  " + "\n  ".join(shown) + more)


def failure_report(seed: int, verdict, trace_dir: Path) -> str:
    """The report of a failed check, also written next to the traces (a failed test keeps its
    directory), so that it survives an output that was cut short."""
    report = f"seed {seed} (replay: WEFT_LIN_SEED={seed}):\n{verdict.report()}\n{trace_excerpt(trace_dir, verdict)}"
    if not verdict.ok:
        try:
            (trace_dir / f"failure-{seed}.txt").write_text(report)
        except OSError as e:
            report += f"\n(could not keep this report in {trace_dir}: {e})"
    return report


@pytest.mark.weft_timeout(900)
def test_concurrent_agents_in_two_hubs_are_linearizable(resources, trace_dir):
    """The default mount: the kernel caches attributes, names and pages and the agents buffer
    writes, all under leases; every conflicting change recalls them first. Writes on descriptors
    kept open (no close) must be visible to reads that start after they return."""
    ops = 400 if os.environ.get("WEFT_SLOW") == "1" else 120
    for seed in seeds(default_count=2):
        history = run_history(resources, seed, ops, rtt_ms=40)
        assert len(history) == 3 * ops
        verdict = check(history, BLOCK)
        assert verdict.ok, failure_report(seed, verdict, trace_dir)


@pytest.mark.weft_timeout(900)
def test_checker_catches_stale_reads_when_recalls_are_disabled(resources, trace_dir):
    """The same run with the hubs' test-only switch WEFT_TEST_NO_RECALL=1: leases are granted but
    never recalled, so caches go stale. The checker must say so (it can fail), and its report
    must quote the lease trace of the agents and the homes around the stale result."""
    env = dict(os.environ, WEFT_TEST_NO_RECALL="1")
    reports = []
    for seed in seeds(default_count=3):
        history = run_history(resources, seed, 120, rtt_ms=40, env=env)
        verdict = check(history, BLOCK)
        if not verdict.ok:
            reports.append(failure_report(seed, verdict, trace_dir))
            break
    assert reports, "with recalls disabled the checker found no stale result in any seed"
    excerpt = reports[0].split("lease trace from ", 1)[-1]
    assert re.search(r"^ +[-0-9.]+ weft-[0-9]+ ", excerpt, re.M), f"no agent's trace in the report:\n{reports[0][-3000:]}"
    assert re.search(r"^ +[-0-9.]+ weftd-[0-9]+ ", excerpt, re.M), f"no home's trace in the report:\n{reports[0][-3000:]}"
    print(f"the checker caught a stale result with recalls disabled:\n{reports[0][:2000]}")


@pytest.mark.weft_timeout(900)
def test_agents_without_kernel_caching_are_linearizable(resources, trace_dir):
    """With --attr-timeout 0 nothing is cached across operations: every open fetches fresh
    attributes (and drops stale pages), every lookup and stat asks the home. Each operation here
    is one open..close, so close-to-open visibility is enough: the history must check out."""
    ops = 400 if os.environ.get("WEFT_SLOW") == "1" else 100
    for seed in seeds(default_count=1):
        history = run_history(resources, seed, ops, rtt_ms=40, mount_options=["--attr-timeout", "0"])
        assert len(history) == 3 * ops
        verdict = check(history, BLOCK)
        assert verdict.ok, failure_report(seed, verdict, trace_dir)


def restart_hub(cluster, name: str) -> None:
    """kill -9 the hub's weftd and start it again with the same arguments."""
    import json
    import signal
    import subprocess
    state_path = cluster.dir / "cluster.json"
    state = json.loads(state_path.read_text())
    entry = next(p for p in state["processes"] if p["name"] == name)
    os.kill(entry["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while harness.pid_alive(entry["pid"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    log = open(cluster.dir / "logs" / f"{name}.log", "ab")
    process = subprocess.Popen(entry["argv"], stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    entry["pid"] = process.pid
    state_path.write_text(json.dumps(state, indent=2))
    port = int(cluster.address(name).rsplit(":", 1)[1])
    assert harness.wait_until(lambda: harness.port_accepts(port), 30), f"{name} did not come back"


@pytest.mark.weft_timeout(900)
def test_agents_without_kernel_caching_stay_linearizable_under_faults(resources, trace_dir):
    """The same run while the far agent's link is cut and healed, the home's weftd is killed
    with -9 and restarted, and one agent is killed with -9 and mounted again: failed calls are
    indeterminate, and whatever did complete must still form a linearizable history."""
    injected = {"cut": 0, "hub restart": 0, "agent restart": 0}

    def faults(cluster, stop, mounts, agents):
        control = cluster.links[("hub2", "hub1")]["control"]
        for agent in agents:
            agent.hold.clear()
        rounds = 0
        while not stop.wait(1.0):
            if all(count > 0 for count in injected.values()):
                for agent in agents:
                    agent.hold.set()   # every kind injected: the clients may finish
            rounds += 1
            # Odd rounds cut the far agent's link for a second; rounds 2 and 6 of every 8 kill -9
            # and restart the home's weftd and one agent. (A home restarted after a crash holds
            # everything but write-lease reclaims for a 6 s grace period, SPEC.md §12.6.)
            if rounds % 8 in (0, 4):
                continue
            if rounds % 8 == 2:
                restart_hub(cluster, "hub1")
                injected["hub restart"] += 1
                continue
            if rounds % 8 == 6:
                # kill -9 one agent under its client, then mount it again.
                victim, mount = agents[1], mounts[1]
                victim.gate.clear()
                mount.kill_agent()
                victim.idle.wait(30)
                mount.lazy_unmount()
                mount.start()
                victim.gate.set()
                injected["agent restart"] += 1
                continue
            injected["cut"] += 1
            resources.run([harness.bin_dir() / "weft-link", "control", control, "cut"])
            stop.wait(1.0)
            resources.run([harness.bin_dir() / "weft-link", "control", control, "heal"])

    ops = 300 if os.environ.get("WEFT_SLOW") == "1" else 100
    for seed in seeds(default_count=1):
        history = run_history(resources, seed, ops, rtt_ms=40, faults=faults,
                              mount_options=["--attr-timeout", "0", "--hub-timeout", "2"])
        assert len(history) == 3 * ops
        failed = [op for op in history if op.indeterminate]
        verdict = check(history, BLOCK)
        assert verdict.ok, failure_report(seed, verdict, trace_dir)
        print(f"seed {seed}: {len(history)} operations, {len(failed)} failed indeterminately, faults {injected}, "
              "linearizable")
        assert all(count > 0 for count in injected.values()), f"a fault was never injected: {injected}"
