"""The command line: help, format/mount/umount/status/fsck error paths, status JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from posix_helpers import read_file, run_as, write_file
from weft_harness import Mount, Weftd, bin_dir, find_key, free_loopback_port, pid_alive, wait_until

HELP_COMMANDS = [
    ("weft", ["--help"]),
    ("weft", ["format", "--help"]),
    ("weft", ["mount", "--help"]),
    ("weft", ["umount", "--help"]),
    ("weft", ["status", "--help"]),
    ("weft", ["fsck", "--help"]),
    ("weft", ["cache", "drop", "--help"]),
    ("weft", ["cache", "stats", "--help"]),
    ("weftd", ["--help"]),
    ("weftd", ["serve", "--help"]),
]


def _says_something(r) -> bool:
    return len(r.output.strip()) > 0


@pytest.mark.parametrize("binary,args", HELP_COMMANDS, ids=[" ".join([b, *a]) for b, a in HELP_COMMANDS])
def test_help_exits_zero(weft_cli, binary, args):
    r = (weft_cli.weft if binary == "weft" else weft_cli.weftd)(*args, timeout_s=30)
    assert r.rc == 0 and not r.timed_out, r.describe()
    assert "usage" in r.output.lower(), f"no usage text:\n{r.describe()}"


def test_format_refuses_existing_hub_without_force(weft_cli, resources):
    hub = resources.base / "hub"
    weft_cli.format(hub)
    again = weft_cli.weft("format", hub)
    assert again.rc != 0 and not again.timed_out, \
        f"format over an existing hub must fail without --force:\n{again.describe()}"
    assert _says_something(again), "format refused silently"
    forced = weft_cli.weft("format", hub, "--force")
    assert forced.rc == 0, f"format --force over an existing hub:\n{forced.describe()}"


def test_format_options_give_a_working_volume(weft_cli, resources):
    hub = resources.base / "hub"
    weft_cli.format(hub, "--chunk-size", 65536, "--compression", "none")
    mountpoint = resources.new_dir("mnt")
    Mount(resources, weft_cli, str(hub), mountpoint).start()
    data = os.urandom(300_000)
    write_file(mountpoint / "f", data)
    assert read_file(mountpoint / "f") == data
    r = weft_cli.weft("umount", mountpoint, timeout_s=120)
    assert r.rc == 0, r.describe()


@pytest.mark.parametrize("bad", [["--chunk-size", "1000"], ["--chunk-size", str(1 << 40)],
                                 ["--compression", "lz77"]], ids=["tiny-chunk", "huge-chunk",
                                                                  "unknown-compression"])
def test_format_rejects_bad_options(weft_cli, resources, bad):
    r = weft_cli.weft("format", resources.base / "hub", *bad)
    assert r.rc != 0 and not r.timed_out, f"format accepted {bad}:\n{r.describe()}"
    assert _says_something(r)


def test_mount_on_missing_mountpoint_fails_clearly(weft_cli, resources):
    hub = resources.base / "hub"
    weft_cli.format(hub)
    missing = resources.base / "no" / "such" / "mountpoint"
    m = Mount(resources, weft_cli, str(hub), missing)
    r = m.try_start(timeout_s=60)
    assert r.rc != 0 and not r.timed_out, f"mount on a missing mount point:\n{r.describe()}"
    text = r.output.lower()
    assert str(missing) in r.output or any(w in text for w in ("no such", "not exist", "does not",
                                                               "not found", "missing")), \
        f"message does not say what is wrong:\n{r.describe()}"
    assert not m.mount_ids
    pid = m.agent_pid
    assert not (pid and pid_alive(pid)), "an agent process stayed behind after a failed mount"


def test_mount_of_missing_hub_dir_fails(weft_cli, resources):
    mountpoint = resources.new_dir("mnt")
    m = Mount(resources, weft_cli, str(resources.base / "not-a-hub"), mountpoint)
    r = m.try_start(timeout_s=60)
    assert r.rc != 0 and not r.timed_out, r.describe()
    assert _says_something(r)
    assert not m.mount_ids, "something got mounted from a missing hub directory"


def test_mount_on_busy_mountpoint_fails(weft):
    weft.require_weft("mounts twice")
    write_file(weft.path / "before", b"first mount")
    second = Mount(weft.res, weft.cli, weft.source, weft.path)
    r = second.try_start(timeout_s=60)
    assert not second.mount_ids, "a second file system was stacked on the busy mount point"
    assert r.rc != 0 and not r.timed_out, f"mount on a busy mount point:\n{r.describe()}"
    assert _says_something(r)
    # The first mount is unharmed.
    assert read_file(weft.path / "before") == b"first mount"
    write_file(weft.path / "after", b"still works")
    assert read_file(weft.path / "after") == b"still works"


def test_mount_unreachable_hub_fails_in_bounded_time(weft_cli, resources):
    port = free_loopback_port()
    mountpoint = resources.new_dir("mnt")
    m = Mount(resources, weft_cli, f"weft://127.0.0.1:{port}", mountpoint)
    started = time.monotonic()
    r = m.try_start(timeout_s=60)
    elapsed = time.monotonic() - started
    assert r.rc != 0 and not r.timed_out, f"mount of an unreachable hub:\n{r.describe()}"
    assert elapsed < 15, f"mount of an unreachable hub took {elapsed:.1f}s (bound: 15 s)"
    text = r.output.lower()
    assert str(port) in r.output or any(w in text for w in ("connect", "refused", "unreachable",
                                                            "timed out", "timeout")), \
        f"message does not say the hub is unreachable:\n{r.describe()}"
    assert not m.mount_ids


@pytest.mark.parametrize("command", ["status", "fsck"])
def test_status_and_fsck_of_missing_dir_fail(weft_cli, resources, command):
    r = weft_cli.weft(command, resources.base / "missing-hub", timeout_s=60)
    assert r.rc != 0 and not r.timed_out, r.describe()
    assert _says_something(r)


def test_umount_of_something_not_mounted_fails(weft_cli, resources):
    d = resources.new_dir("plain")
    r = weft_cli.weft("umount", d, timeout_s=60)
    assert r.rc != 0 and not r.timed_out, r.describe()
    assert _says_something(r)


def _exit_status_within(daemon: Weftd, seconds: float):
    proc = daemon.spawn()
    try:
        return proc.wait(timeout=seconds)
    except Exception:
        return None


def test_weftd_refuses_unformatted_dir(weft_cli, resources):
    empty = resources.new_dir("empty")
    d = Weftd(resources, weft_cli, empty, free_loopback_port())
    rc = _exit_status_within(d, 15)
    assert rc is not None and rc != 0, \
        f"weftd serve on an unformatted directory: exit status {rc} (None = still running)"


def test_weftd_refuses_busy_port(weft_cli, resources):
    hub = resources.base / "hub"
    weft_cli.format(hub)
    first = Weftd(resources, weft_cli, hub, free_loopback_port())
    first.start()
    hub2 = resources.base / "hub2"
    weft_cli.format(hub2)
    second = Weftd(resources, weft_cli, hub2, first.port)
    rc = _exit_status_within(second, 15)
    assert rc is not None and rc != 0, \
        f"second weftd on a busy port: exit status {rc} (None = still running)"
    assert first.alive


def test_status_json_has_expected_keys(weft):
    weft.require_weft("runs weft status")
    write_file(weft.path / "f", os.urandom(200_000), fsync=True)
    status = weft.status_any()
    for key in ("inodes", "chunks", "connectedAgents", "freeBytes"):
        assert find_key(status, key) is not None, f"weft status --json lacks {key!r}: {status}"
    disk = os.statvfs(weft.hub_dir)
    assert 0 < status["freeBytes"] <= disk.f_bavail * disk.f_frsize, \
        f"freeBytes {status['freeBytes']} is not within the hub disk's free space"
    print(json.dumps(status, indent=1)[:2000])
    if weft.mode == "remote":
        agents = find_key(weft.status(), "connectedAgents")
        count = len(agents) if isinstance(agents, list) else agents
        assert count >= 1, f"connectedAgents is {agents!r} while an agent is mounted"


def test_status_plain_text(weft):
    weft.require_weft("runs weft status")
    r = weft.cli.weft("status", weft.source)
    if r.rc != 0 and weft.mode == "embedded":
        with weft.offline():
            r = weft.cli.weft("status", weft.hub_dir)
    assert r.rc == 0 and _says_something(r), r.describe()


def test_umount_waits_for_agent_exit(weft):
    weft.require_weft("checks the agent process")
    write_file(weft.path / "f", os.urandom(1_000_000))    # unflushed data at umount time
    pid = weft.agent_pid
    assert pid and pid_alive(pid), "no live agent pid in the pid file"
    r = weft.cli.weft("umount", weft.path, timeout_s=180)
    assert r.rc == 0, r.describe()
    exited = wait_until(lambda: not pid_alive(pid), 0.5)
    weft.mount_obj.release()
    weft.mount_obj = None
    assert exited, "weft umount returned while the agent was still running"
    weft.mount()
    assert read_file(weft.path / "f") is not None
    assert os.stat(weft.path / "f").st_size == 1_000_000


def _dropped_mib(log_path) -> list[int]:
    return [int(m) for m in re.findall(r"dropped (\d+) MiB of cached data", log_path.read_text(errors="replace"))]


def test_cache_drop_empties_the_agent_cache_and_reads_refill_it(weft):
    weft.require_weft("drops the agent's cache")
    data = os.urandom(9_000_000)
    write_file(weft.path / "f", data, fsync=True)
    assert read_file(weft.path / "f") == data
    r = weft.cli.weft("cache", "drop", weft.path)
    assert r.rc == 0, r.describe()
    assert _dropped_mib(weft.mount_obj.log_file)[-1:] >= [8], "the agent did not report dropping the data it read"
    with open("/proc/sys/vm/drop_caches", "w") as handle:   # the kernel's copy as well
        handle.write("3")
    assert read_file(weft.path / "f") == data, "data read back after the drop differs"
    r = weft.cli.weft("cache", "drop", weft.path)
    assert r.rc == 0, r.describe()
    assert _dropped_mib(weft.mount_obj.log_file)[-1:] >= [8], "the second read did not refill the cache"
    assert os.path.getsize(weft.path / "f") == len(data)


@pytest.mark.parametrize("command, refusal", [("drop", "needs root"), ("stats", "need root")])
def test_cache_commands_need_root_and_a_weft_mount(weft, command, refusal):
    weft.require_weft("asks the agent")
    weft_bin = str(bin_dir() / "weft")

    def run(path):
        done = subprocess.run([weft_bin, "cache", command, path], capture_output=True, text=True, timeout=60)
        return [done.returncode, done.stderr + done.stdout]

    rc, output = run_as(65534, 65534, [], run, str(weft.path))
    assert rc != 0 and refusal in output, f"as nobody: exit {rc}: {output}"
    not_weft = weft.res.new_dir("plain", 0o755)
    r = weft.cli.weft("cache", command, not_weft)
    assert r.rc != 0 and "not a weft mount" in r.output, r.describe()
    r = weft.cli.weft("cache", command, weft.path / "missing")
    assert r.rc != 0, r.describe()
    if command == "stats":
        # Reading the attribute directly, as root, through the mount: the agent's JSON.
        value = json.loads(os.getxattr(weft.path, "trusted.weft.cache.stats"))
        assert "blockCache" in value, value


def _cache_stats(weft) -> dict:
    r = weft.cli.weft("cache", "stats", "--json", weft.path)
    assert r.rc == 0, r.describe()
    return json.loads(r.out)


def _drop_kernel_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3")


def test_cache_stats_count_what_the_agent_fetched_served_and_dropped(weft):
    """SPEC §8, `weft cache stats`: counters since the agent started, the cache's memory."""
    weft.require_weft("reads the agent's counters")
    data = os.urandom(9_000_000)   # two 4 MiB objects and a partial one: 138 blocks of 64 KiB
    write_file(weft.path / "f", data, fsync=True)
    assert weft.cli.weft("cache", "drop", weft.path).rc == 0
    _drop_kernel_caches()
    before = _cache_stats(weft)
    assert before["blockCache"]["usedBytes"] == 0 and before["blockCache"]["blocks"] == 0, before
    assert before["blockCache"]["capacityBytes"] == 1024 << 20, "the default --cache-mb"
    assert before["writeBufferLimitBytes"] > 0

    assert read_file(weft.path / "f") == data
    fetched = _cache_stats(weft)
    cache = fetched["blockCache"]
    new_blocks = (cache["misses"] - before["blockCache"]["misses"]) \
        + (cache["readAheadClaims"] - before["blockCache"]["readAheadClaims"])
    assert new_blocks >= 138, f"every block was fetched, on demand or ahead: {fetched}"
    assert cache["blocks"] >= 138 and cache["usedBytes"] >= len(data), fetched
    assert fetched["slabsInUseBytes"] >= 8 << 20, "the two whole objects' slabs"

    _drop_kernel_caches()
    assert read_file(weft.path / "f") == data
    served = _cache_stats(weft)["blockCache"]
    assert served["hits"] - cache["hits"] >= 138, f"the second read came from the cache: {served}"
    assert served["misses"] == cache["misses"], "and fetched nothing"

    assert weft.cli.weft("cache", "drop", weft.path).rc == 0
    dropped = _cache_stats(weft)
    assert dropped["blockCache"]["usedBytes"] == 0 and dropped["blockCache"]["blocks"] == 0, dropped
    assert dropped["blockCache"]["hits"] == served["hits"], "counters run from the agent's start"
    assert dropped["slabPooledBytes"] > 0, "the dropped slabs are kept for reuse"

    text = weft.cli.weft("cache", "stats", weft.path)
    assert text.rc == 0, text.describe()
    for label in ("block cache", "hits", "misses", "evictions", "slab memory", "write buffer"):
        assert label in text.out, f"{label!r} missing: {text.out}"
