"""A local multi-hub cluster brought up through Deploy/local-cluster (etcd, weftd hubs, weft-link
emulators): the volume and hub commands, and volumes mounted through a hub that is not their home.
SPEC.md §12."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import weft_harness as harness

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "Deploy" / "local-cluster"


class Cluster:
    """`Deploy/local-cluster up` in the test's own directory; `down` at the end, always."""

    def __init__(self, res: harness.Resources, hubs: int, rtt_ms: int, env: dict | None = None):
        self.res = res
        self.dir = res.base / "cluster"
        serial = 1
        while self.dir.exists():  # a test may bring up several clusters, one after the other
            serial += 1
            self.dir = res.base / f"cluster-{serial}"
        r = res.run([LOCAL_CLUSTER, "up", "--hubs", str(hubs), "--rtt-ms", str(rtt_ms), "--dir", self.dir,
                     "--bin", harness.bin_dir()], timeout_s=120, env=env)
        self.started = self.dir.joinpath("cluster.json").exists()
        assert r.rc == 0, f"local-cluster up failed:\n{r.describe()}"
        self.info = json.loads(r.out.strip().splitlines()[-1])
        self.hubs = {h["name"]: h for h in self.info["hubs"]}
        self.links = {(l["from"], l["to"]): l for l in self.info["links"]}

    def down(self) -> harness.CommandResult:
        return self.res.run([LOCAL_CLUSTER, "down", "--dir", self.dir], timeout_s=60)

    def address(self, hub: str) -> str:
        return self.hubs[hub]["address"]

    def weft(self, *args) -> harness.CommandResult:
        return harness.WeftCLI(self.res).weft(*args)

    def weft_json(self, *args):
        r = self.weft(*args, "--json")
        assert r.rc == 0, r.describe()
        return json.loads(r.out)

    def link_stats(self, source: str, target: str) -> dict:
        r = self.res.run([harness.bin_dir() / "weft-link", "control", self.links[(source, target)]["control"], "stats"])
        assert r.rc == 0, r.describe()
        return json.loads(r.out)

    def processes(self) -> list[dict]:
        return json.loads(self.dir.joinpath("cluster.json").read_text()).get("processes", [])


@pytest.fixture
def cluster(resources):
    made = []

    def make(hubs: int = 3, rtt_ms: int = 20) -> Cluster:
        c = Cluster(resources, hubs, rtt_ms)
        made.append(c)
        return c

    yield make
    # Agents first (their hubs must still answer to commit), then the cluster.
    for m in list(resources.mounts):
        if m.active:
            harness.WeftCLI(resources).weft("umount", m.mountpoint, timeout_s=60)
    for c in made:
        c.down()


def test_local_cluster_up_prints_the_cluster_and_down_stops_it(cluster, resources):
    c = cluster(hubs=3, rtt_ms=20)
    assert c.info["etcd"].startswith("http://127.0.0.1:")
    assert sorted(c.hubs) == ["hub1", "hub2", "hub3"]
    for hub in c.info["hubs"]:
        assert hub["source"] == f"weft://{hub['address']}/"
        assert harness.port_accepts(int(hub["address"].rsplit(":", 1)[1]))
    assert len(c.links) == 6, "one link per ordered pair of hubs"
    pids = [p["pid"] for p in c.processes()]
    assert len(pids) == 1 + 3 + 6
    assert all(harness.pid_alive(pid) for pid in pids)
    # The routes the links serve are in the map every hub sees.
    hubs = c.weft_json("hub", "list", f"weft://{c.address('hub3')}")["hubs"]
    by_name = {h["name"]: h for h in hubs}
    assert by_name["hub1"]["routes"]["hub2"] == c.links[("hub1", "hub2")]["address"]
    assert all(h["live"] for h in hubs)
    r = c.down()
    assert r.rc == 0, r.describe()
    assert harness.wait_until(lambda: not any(harness.pid_alive(pid) for pid in pids), 15), \
        "processes left running after local-cluster down"


def test_volume_and_hub_commands(cluster):
    c = cluster(hubs=2, rtt_ms=10)
    source = f"weft://{c.address('hub1')}"
    created = c.weft_json("volume", "create", source, "data", "--home", "hub2", "--chunk-size", str(1 << 20),
                          "--compression", "zstd")
    assert created["name"] == "data" and created["home"] == "hub2" and created["epoch"] == 1
    assert created["chunkSizeBytes"] == 1 << 20 and created["compression"] == "zstd"
    assert created["served"] is True, "volume create returns once the home serves the volume"

    again = c.weft("volume", "create", source, "data", "--home", "hub1")
    assert again.rc != 0 and "exists" in again.err, again.describe()
    for bad_args, word in [(["x", "--home", "nohub"], "no hub"), (["a/b", "--home", "hub1"], "path component"),
                           (["y", "--home", "hub1", "--chunk-size", "1000"], "chunk size"),
                           (["z", "--home", "hub1", "--compression", "lz4"], "compression")]:
        r = c.weft("volume", "create", source, *bad_args)
        assert r.rc != 0 and word in r.err, r.describe()

    listed = c.weft_json("volume", "list", f"weft://{c.address('hub2')}")["volumes"]
    assert [v["name"] for v in listed] == ["data"]
    shown = c.weft_json("volume", "show", source, "data")
    assert shown["id"] == created["id"]
    missing = c.weft("volume", "show", source, "nope")
    assert missing.rc != 0 and "no volume" in missing.err

    hub2 = c.weft_json("hub", "show", source, "hub2")
    assert hub2["live"] and hub2["homeOf"] == ["data"] and hub2["serving"] == ["data"]
    assert hub2["address"] == c.address("hub2")
    r = c.weft("hub", "show", source, "hub9")
    assert r.rc != 0 and "no hub" in r.err
    r = c.weft("volume", "list", "/tmp")
    assert r.rc != 0, "a directory is not a cluster source"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_volume_mounted_through_other_hubs_crosses_their_links(cluster, resources):
    """SPEC §12.5: metadata goes to the home (hub3); chunk data is written to the writer's hub
    (hub1) and read through the readers' hub (hub2), which fetches it from hub1 once for both
    of its agents: the hub1 -> hub2 link carries the file about once."""
    c = cluster(hubs=3, rtt_ms=20)
    c.weft_json("volume", "create", f"weft://{c.address('hub1')}", "shared", "--home", "hub3")
    cli = harness.WeftCLI(resources)
    m1 = harness.Mount(resources, cli, f"weft://{c.address('hub1')}/shared", resources.new_dir("m1"))
    m2a = harness.Mount(resources, cli, f"weft://{c.address('hub2')}/shared", resources.new_dir("m2a"))
    m2b = harness.Mount(resources, cli, f"weft://{c.address('hub2')}/", resources.new_dir("m2b"))
    for m in (m1, m2a, m2b):
        m.start()
    to_home = c.link_stats("hub1", "hub3")["bytesForward"]
    payload = os.urandom(3 << 20)
    (m1.mountpoint / "file.bin").write_bytes(payload)
    (m1.mountpoint / "dir").mkdir()
    assert c.link_stats("hub1", "hub3")["bytesForward"] - to_home < len(payload) // 4, \
        "the writer's data stayed in its own hub; only metadata went to the home"

    wan = c.link_stats("hub2", "hub1")["bytesBackward"]
    home_back = c.link_stats("hub2", "hub3")["bytesBackward"]
    assert (m2a.mountpoint / "file.bin").read_bytes() == payload
    assert (m2b.mountpoint / "shared" / "file.bin").read_bytes() == payload
    assert sorted(os.listdir(m2a.mountpoint)) == ["dir", "file.bin"]
    crossed = c.link_stats("hub2", "hub1")["bytesBackward"] - wan
    print(f"hub1 -> hub2 link: {crossed} bytes for two readers of a {len(payload)}-byte file")
    assert len(payload) <= crossed < len(payload) * 13 // 10, \
        f"two readers in hub2: the file crossed hub1 -> hub2 about once ({crossed} bytes for {len(payload)})"
    assert c.link_stats("hub2", "hub3")["bytesBackward"] - home_back < len(payload) // 4, "no data from the home"

    # A plain weft://HOST:PORT of a cluster hub names no volume: refused with a clear message.
    bare = harness.Mount(resources, cli, f"weft://{c.address('hub1')}", resources.new_dir("bare"))
    r = bare.try_start()
    assert r.rc != 0 and "name a volume" in r.output, r.describe()
    unknown = harness.Mount(resources, cli, f"weft://{c.address('hub1')}/nope", resources.new_dir("unknown"))
    r = unknown.try_start()
    assert r.rc != 0 and "no volume" in r.output, r.describe()


def test_global_root_lists_every_volume_and_keeps_them_apart(cluster, resources):
    c = cluster(hubs=2, rtt_ms=20)
    first = f"weft://{c.address('hub1')}"
    c.weft_json("volume", "create", first, "alpha", "--home", "hub1")
    c.weft_json("volume", "create", first, "beta", "--home", "hub2")
    cli = harness.WeftCLI(resources)
    g1 = harness.Mount(resources, cli, c.hubs["hub1"]["source"], resources.new_dir("g1"))
    g2 = harness.Mount(resources, cli, c.hubs["hub2"]["source"], resources.new_dir("g2"))
    g1.start()
    g2.start()
    root1, root2 = g1.mountpoint, g2.mountpoint
    assert sorted(os.listdir(root1)) == ["alpha", "beta"]
    assert sorted(os.listdir(root2)) == ["alpha", "beta"]

    # Each volume is read and written through either hub's root.
    data = os.urandom(1 << 20)
    (root1 / "alpha" / "a.bin").write_bytes(data)
    (root2 / "beta" / "b.txt").write_text("from hub2's region")
    assert (root2 / "alpha" / "a.bin").read_bytes() == data
    assert (root1 / "beta" / "b.txt").read_text() == "from hub2's region"

    # Distinct inode numbers across volumes; a volume root's parent is the global root.
    inodes = {os.stat(root1 / "alpha").st_ino, os.stat(root1 / "beta").st_ino, os.stat(root1).st_ino}
    assert len(inodes) == 3
    assert os.stat(root1 / "alpha" / "..").st_ino == os.stat(root1).st_ino

    # Rename and link across volumes are EXDEV; the root itself is not writable.
    for call in (lambda: os.rename(root1 / "alpha" / "a.bin", root1 / "beta" / "a.bin"),
                 lambda: os.link(root1 / "alpha" / "a.bin", root1 / "beta" / "hard")):
        with pytest.raises(OSError) as error:
            call()
        assert error.value.errno == errno.EXDEV
    assert (root1 / "alpha" / "a.bin").read_bytes() == data, "a refused rename must leave the file"
    for call, expected in ((lambda: os.mkdir(root1 / "gamma"), errno.EPERM),
                           (lambda: open(root1 / "file", "w"), errno.EPERM),
                           (lambda: os.rmdir(root1 / "alpha"), errno.EPERM),
                           (lambda: os.rename(root1 / "alpha", root1 / "delta"), errno.EPERM)):
        with pytest.raises(OSError) as error:
            call()
        assert error.value.errno == expected, call
    with pytest.raises(FileNotFoundError):
        os.stat(root1 / "no-such-volume")

    # A volume created after the mount shows up in the root.
    c.weft_json("volume", "create", first, "gamma", "--home", "hub2")
    assert harness.wait_until(lambda: "gamma" in os.listdir(root1), 10)
    (root1 / "gamma" / "late").write_text("ok")
    assert (root2 / "gamma" / "late").read_text() == "ok"


def test_read_after_write_across_hubs_without_close(cluster, resources):
    """SPEC.md §6, §12.6: once write() returned in one hub, a read that starts afterwards in
    another hub returns the bytes, and stat, lookups and listings follow at once, though the
    writer keeps the file open and never syncs it, and the kernel caches with its defaults."""
    c = cluster(hubs=3, rtt_ms=20)
    c.weft_json("volume", "create", f"weft://{c.address('hub1')}", "shared", "--home", "hub3")
    cli = harness.WeftCLI(resources)
    near = harness.Mount(resources, cli, c.hubs["hub1"]["source"], resources.new_dir("near"))
    far = harness.Mount(resources, cli, c.hubs["hub2"]["source"], resources.new_dir("far"))
    near.start()
    far.start()
    a, b = near.mountpoint / "shared", far.mountpoint / "shared"
    assert os.listdir(b) == []  # the far agent caches the (empty) listing and names under a lease
    fd = os.open(a / "log", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.listdir(b) == ["log"], "a create is listed at once elsewhere"
        assert os.stat(b / "log").st_size == 0
        reader = os.open(b / "log", os.O_RDONLY)
        try:
            for round in range(5):
                record = f"record {round}\n".encode() * 100
                offset = round * len(record)
                assert os.pwrite(fd, record, offset) == len(record)
                # No close, no fsync: the far agent's read recalls the writer's lease first.
                assert os.pread(reader, len(record), offset) == record, f"round {round}"
                assert os.stat(b / "log").st_size == offset + len(record)
        finally:
            os.close(reader)
    finally:
        os.close(fd)
    # Rename and unlink are seen at once too (names cached in the far kernel are recalled).
    os.rename(a / "log", a / "log.1")
    assert os.listdir(b) == ["log.1"]
    assert not os.path.exists(b / "log")
    os.unlink(a / "log.1")
    assert not os.path.exists(b / "log.1")
    assert os.listdir(b) == []


def test_unreachable_home_fails_bounded_other_volumes_work_and_service_resumes(cluster, resources):
    c = cluster(hubs=2, rtt_ms=20)
    first = f"weft://{c.address('hub1')}"
    c.weft_json("volume", "create", first, "near", "--home", "hub1")
    c.weft_json("volume", "create", first, "far", "--home", "hub2")
    cli = harness.WeftCLI(resources)
    g = harness.Mount(resources, cli, c.hubs["hub1"]["source"], resources.new_dir("g"), options=["--hub-timeout", "2"])
    g.start()
    root = g.mountpoint
    kept = os.urandom(2 << 20)
    with open(root / "far" / "kept.bin", "wb") as f:
        f.write(kept)
        f.flush()
        os.fsync(f.fileno())
    (root / "near" / "before").write_text("near")

    control = c.links[("hub1", "hub2")]["control"]
    r = resources.run([harness.bin_dir() / "weft-link", "control", control, "cut"])
    assert r.rc == 0, r.describe()
    try:
        start = time.monotonic()
        with pytest.raises(OSError) as error:
            os.stat(root / "far" / "never-seen")
        elapsed = time.monotonic() - start
        assert error.value.errno in (errno.ETIMEDOUT, errno.EIO), error.value
        assert elapsed < 8, f"a call to the cut-off home took {elapsed:.1f} s with --hub-timeout 2"
        # The volume homed on this side of the cut keeps working, promptly.
        start = time.monotonic()
        (root / "near" / "during").write_text("still here")
        assert (root / "near" / "during").read_text() == "still here"
        assert time.monotonic() - start < 2
    finally:
        r = resources.run([harness.bin_dir() / "weft-link", "control", control, "heal"])
        assert r.rc == 0, r.describe()

    def far_answers():
        try:
            return (root / "far" / "kept.bin").read_bytes() == kept
        except OSError:
            return False
    assert harness.wait_until(far_answers, 20), "service did not resume after the link healed"
    (root / "far" / "after").write_text("resumed")
    assert (root / "far" / "after").read_text() == "resumed"
    assert sorted(os.listdir(root / "near")) == ["before", "during"]


HOLDER = r"""
import fcntl, os, sys, time
path, kind = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR)
if kind == "posix":
    fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)    # bytes 0..99
else:
    fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()                          # hold until told (or killed)
"""


def test_locks_work_across_hubs_and_die_with_their_agent(cluster, resources):
    import fcntl
    import struct
    import subprocess
    import sys
    import threading

    c = cluster(hubs=2, rtt_ms=20)
    created = c.weft_json("volume", "create", f"weft://{c.address('hub1')}", "locks", "--home", "hub1")
    assert created["served"] is True, "created through its own home, the volume is served on return"
    cli = harness.WeftCLI(resources)
    a = harness.Mount(resources, cli, f"weft://{c.address('hub1')}/locks", resources.new_dir("a"))
    b = harness.Mount(resources, cli, f"weft://{c.address('hub2')}/locks", resources.new_dir("b"))
    a.start()
    b.start()
    (a.mountpoint / "f").write_bytes(b"x" * 4096)

    def hold(kind):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(a.mountpoint / "f"), kind],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    fd = os.open(b.mountpoint / "f", os.O_RDWR)
    try:
        # POSIX byte-range lock held through hub1's agent, seen from hub2's.
        holder = hold("posix")
        with pytest.raises(OSError) as error:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
        assert error.value.errno in (errno.EAGAIN, errno.EACCES)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 200)   # bytes 200..299 are free
        # F_GETLK names the holder.
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 10, 0)
        answer = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query + b"\0" * 4)[:struct.calcsize("hhqqi")])
        assert answer[0] == fcntl.F_WRLCK and answer[4] == holder.pid, answer
        # A blocking lock waits for the holder to let go.
        acquired = threading.Event()
        waiter = threading.Thread(target=lambda: (fcntl.lockf(fd, fcntl.LOCK_EX, 50, 0), acquired.set()), daemon=True)
        waiter.start()
        assert not acquired.wait(1.0), "F_SETLKW returned while another agent held the lock"
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=10)
        assert acquired.wait(10), "F_SETLKW was not granted after the holder exited (its close released the lock)"
        fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0)

        # flock, held by a process whose agent is then killed: released with the agent's session.
        holder = hold("flock")
        with pytest.raises(OSError) as error:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert error.value.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
        a.kill_agent()
        assert harness.wait_until(lambda: _try_flock(fd), 15), "a dead agent's flock was never released"
        fcntl.flock(fd, fcntl.LOCK_UN)
        holder.kill()
        holder.wait(timeout=10)
    finally:
        os.close(fd)
        a.lazy_unmount()


def _try_flock(fd) -> bool:
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def test_partitioned_agent_loses_its_locks_after_the_session_timeout(resources):
    """An agent cut off from the home stops pinging; the home ends its session (and locks)."""
    import fcntl
    import subprocess
    import sys

    r = resources.run([LOCAL_CLUSTER, "up", "--hubs", "2", "--rtt-ms", "10", "--dir", resources.base / "cluster",
                       "--bin", harness.bin_dir(), "--session-timeout", "3"], timeout_s=120)
    assert r.rc == 0, r.describe()
    info = json.loads(r.out.strip().splitlines()[-1])
    hubs = {h["name"]: h["address"] for h in info["hubs"]}
    control = {(l["from"], l["to"]): l["control"] for l in info["links"]}
    cli = harness.WeftCLI(resources)
    try:
        created = cli.weft("volume", "create", f"weft://{hubs['hub1']}", "v", "--home", "hub1")
        assert created.rc == 0, created.describe()
        near = harness.Mount(resources, cli, f"weft://{hubs['hub1']}/v", resources.new_dir("near"))
        far = harness.Mount(resources, cli, f"weft://{hubs['hub2']}/v", resources.new_dir("far"))
        near.start()
        far.start()
        (near.mountpoint / "f").write_text("x")
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(far.mountpoint / "f"), "flock"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        fd = os.open(near.mountpoint / "f", os.O_RDWR)
        try:
            assert not _try_flock(fd), "the far agent holds the lock"
            # Idle for longer than the session timeout while connected: pings keep the session.
            time.sleep(4.5)
            assert not _try_flock(fd), "a connected, idle agent lost its lock"
            cut = resources.run([harness.bin_dir() / "weft-link", "control", control[("hub2", "hub1")], "cut"])
            assert cut.rc == 0, cut.describe()
            start = time.monotonic()
            assert harness.wait_until(lambda: _try_flock(fd), 20), "the cut-off agent's lock was never released"
            assert time.monotonic() - start < 15
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            resources.run([harness.bin_dir() / "weft-link", "control", control[("hub2", "hub1")], "heal"])
            holder.kill()
            holder.wait(timeout=10)
    finally:
        for m in list(resources.mounts):
            if m.active:
                cli.weft("umount", m.mountpoint, timeout_s=60)
        resources.run([LOCAL_CLUSTER, "down", "--dir", resources.base / "cluster"], timeout_s=60)
