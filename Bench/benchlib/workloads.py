"""The workloads: the same fio and mdbench runs, with the same parameters, on every target.

Results go into `results[workload_id][target_name]` as {"value", "unit", "extra"} or
{"error"}; raw fio JSON and mdbench output are kept under OUT/raw/<target>/.
"""

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass

from . import tools
from .system import MIB, BenchError, drop_caches, log, proc_status_kib, run, start_daemon, stop_daemon
from .targets import WeftTarget

SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync", "msync")


@dataclass
class Parameters:
    """Sizes for one run; quick() is the smoke-test preset."""
    seq_file_mib: int = 2048
    seq_jobs: tuple = (1, 4)
    randread_file_mib: int = 1024
    randread_seconds: int = 20
    metadata_files: int = 10000
    metadata_spread_dirs: int = 100
    metadata_threads: int = 4
    small_files: int = 10000
    small_file_bytes: int = 4096
    fsync_appends: int = 2000
    fsync_append_bytes: int = 4096
    rss_write_mib: int = 10240
    rss_write_buffer_mb: int = 256
    rss_cache_mb: int = 512
    rss_allowance_mb: int = 256
    rss_sample_seconds: float = 0.1
    durability_probe_appends: int = 50

    @classmethod
    def quick(cls):
        return cls(seq_file_mib=256, randread_seconds=5, metadata_files=2000, small_files=2000,
                   fsync_appends=500, rss_write_mib=1024)

    def as_dict(self):
        return asdict(self)


METADATA_LAYOUTS = (  # (suffix, spread over dirs?, threads?)
    ("1dir", False, False),
    ("100dirs", True, False),
    ("100dirs-4t", True, True),
)


def catalogue(params):
    """Ordered workload descriptions: id -> {family, title, unit}."""
    items = []
    for jobs in params.seq_jobs:
        items.append((f"seqwrite-{jobs}j", "seqwrite",
                      f"Sequential write, 1 MiB blocks, {jobs} job(s) × {params.seq_file_mib} MiB, end_fsync",
                      "MiB/s"))
    for jobs in params.seq_jobs:
        items.append((f"seqwrite-odirect-{jobs}j", "seqwrite",
                      f"Sequential write, 4 MiB blocks, O_DIRECT, {jobs} job(s) × {params.seq_file_mib} MiB, "
                      "end_fsync: the disk's own rate (local only, a ceiling, not a goal)", "MiB/s"))
    for kind, words in (("cold", "cold (page cache dropped + remount)"),
                        ("warm", "warm (re-read at once, no remount)"),
                        ("fsmem", "FS memory (re-read after dropping the page cache only)"),
                        ("coldlive", "cold, file system left running (Weft: `weft cache drop` + page cache "
                                     "dropped; the others as cold)")):
        for jobs in params.seq_jobs:
            items.append((f"seqread-{kind}-{jobs}j", "seqread", f"Sequential read 1 MiB, {jobs} job(s), {words}",
                          "MiB/s"))
    for jobs in params.seq_jobs:
        items.append((f"seqread-odirect-{jobs}j", "seqread",
                      f"Sequential read 4 MiB, O_DIRECT, {jobs} job(s): the disk's own rate (local only, "
                      "a ceiling, not a goal)", "MiB/s"))
    items.append(("randread-4k-buffered", "randread",
                  f"Random read 4 KiB, 1 job, {params.randread_file_mib} MiB file, {params.randread_seconds} s, "
                  "buffered, cold start", "IOPS"))
    items.append(("randread-4k-direct", "randread",
                  f"Random read 4 KiB, 1 job, {params.randread_file_mib} MiB file, {params.randread_seconds} s, "
                  "O_DIRECT, cold start", "IOPS"))
    for suffix, spread, threaded in METADATA_LAYOUTS:
        where = f"{params.metadata_spread_dirs} dirs" if spread else "1 dir"
        threads = params.metadata_threads if threaded else 1
        for phase in ("create", "stat", "unlink"):
            items.append((f"md-{phase}-{suffix}", "metadata",
                          f"{phase} {params.metadata_files} files, {where}, {threads} thread(s)", "ops/s"))
    items.append(("thread-handoff", "metadata",
                  "Thread hand-off round trips (two threads, mutex + condition variable): the machine's own cost "
                  "of waking a thread, local only, not a goal", "ops/s"))
    items.append(("small-write", "smallfiles",
                  f"Write {params.small_files} × {params.small_file_bytes} B files "
                  f"({params.metadata_spread_dirs} dirs)", "files/s"))
    items.append(("small-read", "smallfiles",
                  f"Read back {params.small_files} × {params.small_file_bytes} B files, cold", "files/s"))
    items.append(("fsync-append", "fsync",
                  f"Append {params.fsync_append_bytes} B + fsync, {params.fsync_appends} times", "ops/s"))
    items.append(("fsync-overwrite", "fsync",
                  f"Overwrite {params.fsync_append_bytes} B of written blocks + fdatasync, {params.fsync_appends} "
                  "times: a sync that writes data only, as a log over blocks it wrote before pays (Weft's metadata "
                  "journal); local only, not a goal", "ops/s"))
    return {wid: {"family": family, "title": title, "unit": unit} for wid, family, title, unit in items}


class Runner:
    """Runs every selected workload family on one target and records the figures."""

    def __init__(self, context, params, results, rss_results, families, round_label=None):
        self.context = context
        self.round_label = round_label
        self.params = params
        self.results = results
        self.rss_results = rss_results
        self.families = families
        self.workloads = catalogue(params)

    # --- bookkeeping -------------------------------------------------------------------------
    def _record(self, target, workload_id, value, extra=None):
        unit = self.workloads[workload_id]["unit"]
        self.results.setdefault(workload_id, {})[target.name] = {"value": value, "unit": unit, "extra": extra or {}}
        log(f"{target.name:24s} {workload_id:24s} {value:12.1f} {unit}")

    def _record_family_error(self, target, family, message):
        for workload_id, meta in self.workloads.items():
            if meta["family"] == family:
                cell = self.results.setdefault(workload_id, {})
                cell.setdefault(target.name, {"error": message})

    def _raw_path(self, target, label):
        directory = os.path.join(self.context.out_dir, "raw", *([self.round_label] if self.round_label else []),
                                 target.name)
        os.makedirs(directory, exist_ok=True)
        return os.path.join(directory, label)

    def _bench_dir(self, target, name):
        path = os.path.join(target.mountpoint, "bench", name)
        os.makedirs(path, exist_ok=True)
        return path

    @staticmethod
    def _remove(path):
        run(["rm", "-rf", "--one-file-system", path], 1800)

    # --- tools -------------------------------------------------------------------------------
    def _fio(self, target, label, args, megabytes):
        """Runs fio (psync, no fallocate, group reporting) and returns the group's job JSON."""
        output = self._raw_path(target, f"{label}.json")
        command = ["fio", "--output-format=json", f"--output={output}", "--ioengine=psync", "--fallocate=none",
                   "--group_reporting", *args]
        timeout = self.context.timeout_scale * (120 + megabytes / 10.0)  # assume at least 10 MiB/s
        started = time.monotonic()
        run(command, timeout)
        wall = time.monotonic() - started
        with open(output) as handle:
            text = handle.read()
        try:
            data = json.loads(text[text.index("{"):])
        except ValueError as error:
            raise BenchError(f"fio {label}: unreadable JSON output {output}: {error}") from error
        job = data["jobs"][0]
        if job.get("error"):
            raise BenchError(f"fio {label}: job error {job['error']}")
        job["_wall_seconds"] = wall
        return job

    def _mdbench(self, target, label, phase, directory, *options, operations):
        command = [self.context.mdbench_path, phase, directory, *map(str, options)]
        timeout = self.context.timeout_scale * (60 + operations / 20.0)  # assume at least 20 ops/s
        result = run(command, timeout)
        with open(self._raw_path(target, f"{label}.json"), "w") as handle:
            handle.write(result.stdout)
        return json.loads(result.stdout.strip().splitlines()[-1])

    # --- driver ------------------------------------------------------------------------------
    def run_target(self, target):
        for family in ("seqwrite", "seqread", "randread", "metadata", "smallfiles", "fsync", "rss"):
            if family not in target.families or family not in self.families:
                continue
            log(f"{target.name}: {family}")
            try:
                # What the previous family left to do in the background (writeback, deleting the
                # files it removed) must not land in this family's timed loops.
                waited = target.settle()
                if waited:
                    log(f"{target.name}: settled in {waited:.1f} s")
                getattr(self, f"_run_{family}")(target)
            except BenchError as error:
                message = str(error).strip()
                log(f"{target.name}: {family} failed: {message}")
                self._record_family_error(target, family, message.splitlines()[0][:300])
                if family == "rss":
                    self.rss_results[target.name] = {"error": message.splitlines()[0][:300]}
                if not target.is_healthy():
                    log(f"{target.name}: not mounted any more; remounting once")
                    target.mount()

    def _run_seqwrite(self, target):
        for jobs in self.params.seq_jobs:
            self._seqwrite(target, f"seqwrite-{jobs}j", "seq", jobs)
            if target.name == "local":
                # The disk's own direct-I/O write rate in this run, next to the file systems'
                # figures: 4 MiB O_DIRECT writes (what Weft's chunk store issues).
                self._seqwrite(target, f"seqwrite-odirect-{jobs}j", "seqdirect", jobs, direct=True)
                self._remove(os.path.join(target.mountpoint, "bench", f"seqdirect{jobs}"))

    def _seqwrite(self, target, workload_id, name, jobs, direct=False):
        """fio sequential write of `jobs` files of the run's size, ending in fsync, after a
        page-cache drop (every write starts with no dirty data and a clean page cache)."""
        directory = self._bench_dir(target, f"{name}{jobs}")
        drop_caches()
        job = self._fio(target, workload_id,
                        [f"--name={name}", f"--directory={directory}", "--rw=write",
                         "--bs=4M" if direct else "--bs=1M", f"--direct={int(direct)}",
                         f"--size={self.params.seq_file_mib}M", f"--numjobs={jobs}", "--end_fsync=1",
                         f"--filename_format={name}.$jobnum"], self.params.seq_file_mib * jobs)
        write = job["write"]
        self._record(target, workload_id, write["bw_bytes"] / MIB,
                     {"io_bytes": write["io_bytes"], "runtime_ms": write["runtime"],
                      "wall_seconds": round(job["_wall_seconds"], 3)})

    def _seqread(self, target, workload_id, directory, jobs, direct=False):
        job = self._fio(target, workload_id,
                        ["--name=seq", f"--directory={directory}", "--rw=read",
                         "--bs=4M" if direct else "--bs=1M", f"--direct={int(direct)}",
                         f"--size={self.params.seq_file_mib}M", f"--numjobs={jobs}",
                         "--filename_format=seq.$jobnum"], self.params.seq_file_mib * jobs)
        read = job["read"]
        expected = self.params.seq_file_mib * jobs * MIB
        if read["io_bytes"] < expected:
            raise BenchError(f"{workload_id}: read {read['io_bytes']} bytes, expected {expected}")
        self._record(target, workload_id, read["bw_bytes"] / MIB,
                     {"io_bytes": read["io_bytes"], "runtime_ms": read["runtime"]})

    def _run_seqread(self, target):
        for jobs in self.params.seq_jobs:
            directory = os.path.join(target.mountpoint, "bench", f"seq{jobs}")
            for index in range(jobs):
                path = os.path.join(directory, f"seq.{index}")
                if not os.path.exists(path) or os.path.getsize(path) != self.params.seq_file_mib * MIB:
                    raise BenchError(f"sequential write did not leave {path} at full size")
            target.make_cold()
            self._seqread(target, f"seqread-cold-{jobs}j", directory, jobs)
            self._seqread(target, f"seqread-warm-{jobs}j", directory, jobs)
            self._hold_in_own_memory(target, directory, jobs)
            self._seqread(target, f"seqread-fsmem-{jobs}j", directory, jobs)
            target.make_cold_running()
            self._seqread(target, f"seqread-coldlive-{jobs}j", directory, jobs)
            if target.name == "local":  # the disk's own direct-I/O read rate of the same files
                drop_caches()
                self._seqread(target, f"seqread-odirect-{jobs}j", directory, jobs, direct=True)
            self._remove(directory)

    def _hold_in_own_memory(self, target, directory, jobs):
        """Before `fsmem`: the files must be in the file system's own memory, the page cache
        dropped. memfs holds them by design. Weft's agent holds what its block cache bounds
        (`--cache-mb`, 1 GiB by default: less than the 4-job files in full mode, and just the
        4-job files in quick mode, so part of them was evicted): a Weft target is remounted
        with a cache that holds the files (capped by the memory available) and reads them once,
        unmeasured, to fill it."""
        if isinstance(target, WeftTarget):
            needed = jobs * self.params.seq_file_mib
            cache_mib = needed + needed // 8 + 64
            available = tools.memory_available_mib()
            if available is not None and cache_mib > available - 4096:
                log(f"WARNING: {target.name}: {cache_mib} MiB of block cache wanted for fsmem-{jobs}j, "
                    f"{available} MiB available: the files may not all stay in the agent's memory")
                cache_mib = max(1024, available - 4096)
            target.info[f"fsmem_{jobs}j_cache_mib"] = cache_mib
            target.unmount()
            target.mount(["--cache-mb", str(cache_mib)])
            self._fio(target, f"seqread-fsmem-fill-{jobs}j",
                      ["--name=seq", f"--directory={directory}", "--rw=read", "--bs=1M",
                       f"--size={self.params.seq_file_mib}M", f"--numjobs={jobs}",
                       "--filename_format=seq.$jobnum"], needed)
        drop_caches()

    def _run_randread(self, target):
        directory = self._bench_dir(target, "rand")
        common = ["--name=rand", f"--directory={directory}", "--bs=4k", f"--size={self.params.randread_file_mib}M",
                  "--filename_format=rand.$jobnum", "--numjobs=1"]
        self._fio(target, "randread-layout", [*common[:2], "--rw=write", "--bs=1M", *common[3:], "--end_fsync=1"],
                  self.params.randread_file_mib)
        for mode, direct in (("buffered", 0), ("direct", 1)):
            target.make_cold()
            workload_id = f"randread-4k-{mode}"
            job = self._fio(target, workload_id,
                            [*common, "--rw=randread", f"--direct={direct}", "--time_based",
                             f"--runtime={self.params.randread_seconds}"], self.params.randread_file_mib)
            read = job["read"]
            percentiles = read.get("clat_ns", {}).get("percentile", {})
            self._record(target, workload_id, read["iops"],
                         {"mib_per_sec": round(read["bw_bytes"] / MIB, 2),
                          "clat_p50_us": round(percentiles.get("50.000000", 0) / 1000, 1),
                          "clat_p99_us": round(percentiles.get("99.000000", 0) / 1000, 1)})
        self._remove(directory)

    def _run_metadata(self, target):
        files = self.params.metadata_files
        for suffix, spread, threaded in METADATA_LAYOUTS:
            directory = self._bench_dir(target, f"md-{suffix}")
            options = ["--files", files, "--dirs", self.params.metadata_spread_dirs if spread else 1,
                       "--threads", self.params.metadata_threads if threaded else 1]
            for phase in ("create", "stat", "unlink"):
                if phase == "stat":
                    drop_caches()  # every stat must reach the file system, whatever its cache timeouts
                result = self._mdbench(target, f"md-{phase}-{suffix}", phase, directory, *options, operations=files)
                self._record(target, f"md-{phase}-{suffix}", result["ops_per_sec"],
                             {"seconds": result["seconds"], "ops": result["ops"], "threads": result["threads"]})
            os.rmdir(directory)
        if target.name == "local":
            # What every hand-off between threads costs here (FUSE thread, event loops, workers).
            result = self._mdbench(target, "thread-handoff", "handoff", self.context.out_dir, "--count", 20000,
                                   operations=20000)
            self._record(target, "thread-handoff", result["ops_per_sec"], {"seconds": result["seconds"]})
        # What a create costs underneath in syncs: shows which targets compare at equal durability.
        directory = self._bench_dir(target, "md-probe")
        count = self.params.durability_probe_appends
        extra = {}
        try:
            extra["durability_probe"] = self._durability_probe(
                target, "metadata-probe", ["create", directory, "--files", count, "--dirs", 1, "--threads", 1], count)
        except BenchError as error:
            extra["durability_probe"] = {"error": str(error).splitlines()[0][:300]}
        self._mdbench(target, "md-probe-cleanup", "unlink", directory, "--files", count, "--dirs", 1, "--threads", 1,
                      operations=count)
        self._remove(directory)
        self.results.setdefault("md-durability-probe", {})[target.name] = {"extra": extra}

    def _run_smallfiles(self, target):
        files, size = self.params.small_files, self.params.small_file_bytes
        directory = self._bench_dir(target, "small")
        options = ["--files", files, "--dirs", self.params.metadata_spread_dirs, "--size", size]
        for phase, workload_id in (("smallwrite", "small-write"), ("smallread", "small-read")):
            if phase == "smallread":
                target.make_cold()
            result = self._mdbench(target, workload_id, phase, directory, *options, operations=files)
            self._record(target, workload_id, result["ops_per_sec"],
                         {"mib_per_sec": result["mib_per_sec"], "seconds": result["seconds"]})
        self._mdbench(target, "small-cleanup", "unlink", directory, *options, operations=files)
        os.rmdir(directory)

    def _run_fsync(self, target):
        directory = self._bench_dir(target, "fsync")
        count = self.params.fsync_appends
        result = self._mdbench(target, "fsync-append", "fsyncappend", directory, "--count", count,
                               "--size", self.params.fsync_append_bytes, operations=count)
        extra = {"mib_per_sec": result["mib_per_sec"], "seconds": result["seconds"]}
        self._record(target, "fsync-append", result["ops_per_sec"], extra)
        if target.name == "local":
            overwrite = self._mdbench(target, "fsync-overwrite", "fsyncoverwrite", directory, "--count", count,
                                      "--size", self.params.fsync_append_bytes, operations=count)
            self._record(target, "fsync-overwrite", overwrite["ops_per_sec"], {"seconds": overwrite["seconds"]})
        try:
            extra["durability_probe"] = self._durability_probe(
                target, "durability-probe",
                ["fsyncappend", directory, "--count", self.params.durability_probe_appends,
                 "--size", self.params.fsync_append_bytes], self.params.durability_probe_appends)
        except BenchError as error:
            extra["durability_probe"] = {"error": str(error).splitlines()[0][:300]}
        self._remove(directory)

    def _durability_probe(self, target, label, mdbench_arguments, operations):
        """Counts the sync system calls the file system's own processes make while mdbench runs
        `mdbench_arguments` (`operations` appends + fsync, or creates).

        Run apart from the timed loop (strace slows the traced processes). It shows whether an
        fsync or a create on the mount reaches stable storage: 0 calls per operation means it does not.
        """
        pids = target.server_pids()
        if not pids:
            return {"note": "served by the kernel: not traced"}
        if not shutil.which("strace"):
            return {"note": "strace not installed"}
        summary = self._raw_path(target, f"{label}.strace")
        command = ["strace", "-f", "-c", "-o", summary, "-e", f"trace={','.join(SYNC_CALLS)}"]
        for pid in pids:
            command += ["-p", str(pid)]
        tracer = start_daemon(command, self._raw_path(target, f"{label}.log"))
        try:
            time.sleep(1.0)  # let strace attach to every thread
            if tracer.poll() is not None:
                raise BenchError(f"strace exited with {tracer.returncode}")
            self._mdbench(target, label, *mdbench_arguments, operations=operations)
            time.sleep(0.5)  # syncs done after the reply (group commit, background flush) count too
        finally:
            tracer.send_signal(signal.SIGINT)  # strace detaches and writes its summary
            try:
                tracer.wait(timeout=15)
            except Exception:
                pass
            stop_daemon(tracer)
        with open(self._raw_path(target, f"{label}.log"), errors="replace") as handle:
            if "attached" not in handle.read():
                raise BenchError("strace did not attach to the file system's processes")
        calls = parse_strace_summary(summary)
        total = sum(calls.values())
        return {"operations": operations, "sync_syscalls": total, "per_operation": round(total / operations, 2),
                "by_call": calls, "traced_pids": pids}

    def _run_rss(self, target):
        """Remounts with bounded buffers, writes a large file and samples the agent's RSS."""
        params = self.params
        target.unmount()
        target.mount(["--write-buffer-mb", str(params.rss_write_buffer_mb), "--cache-mb", str(params.rss_cache_mb)])
        drop_caches()
        pid = target.agent_pid()
        if not pid:
            raise BenchError("agent pid unknown (no --pid-file written and no process found)")
        sampler = RssSampler(pid, params.rss_sample_seconds, target.hub_pid())
        sampler.start()
        try:
            directory = self._bench_dir(target, "rss")
            job = self._fio(target, "rss-write",
                            ["--name=rss", f"--directory={directory}", "--rw=write", "--bs=1M", "--direct=0",
                             f"--size={params.rss_write_mib}M", "--numjobs=1", "--end_fsync=1"],
                            params.rss_write_mib)
        finally:
            sampler.stop()
        configured = params.rss_write_buffer_mb + params.rss_cache_mb
        peak_mib = max(sampler.max_rss_kib, sampler.hwm_kib) / 1024
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                agent_command = handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            agent_command = None
        self.rss_results[target.name] = {
            "agent_pid": pid,
            "agent_command": agent_command,
            "write_mib": params.rss_write_mib,
            "write_mib_per_sec": round(job["write"]["bw_bytes"] / MIB, 1),
            "write_buffer_mb": params.rss_write_buffer_mb,
            "cache_mb": params.rss_cache_mb,
            "configured_bound_mib": configured,
            "allowance_mib": params.rss_allowance_mb,
            "bound_with_allowance_mib": configured + params.rss_allowance_mb,
            "max_vmrss_mib": round(sampler.max_rss_kib / 1024, 1),
            "vmhwm_mib": round(sampler.hwm_kib / 1024, 1),
            "peak_mib": round(peak_mib, 1),
            "hub_max_vmrss_mib": round(sampler.hub_max_rss_kib / 1024, 1) if target.hub_pid() else None,
            "samples": sampler.samples,
            "timeline_mib": sampler.timeline[-600:],
        }
        log(f"{target.name}: agent peak RSS {peak_mib:.0f} MiB (configured {configured} MiB "
            f"+ {params.rss_allowance_mb} MiB allowance)")
        self._remove(directory)


class RssSampler:
    """Samples VmRSS (and finally VmHWM) of one pid every interval on a background thread."""

    def __init__(self, pid, interval_seconds, hub_pid=None):
        self.pid = pid
        self.hub_pid = hub_pid
        self.interval_seconds = interval_seconds
        self.max_rss_kib = 0
        self.hwm_kib = 0
        self.hub_max_rss_kib = 0
        self.samples = 0
        self.timeline = []  # (seconds since start, MiB), one per second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self._started = time.monotonic()
        self._thread.start()

    def _loop(self):
        last_timeline = -1
        while not self._stop.is_set():
            rss = proc_status_kib(self.pid, "VmRSS")
            if rss is not None:
                self.samples += 1
                self.max_rss_kib = max(self.max_rss_kib, rss)
                elapsed = int(time.monotonic() - self._started)
                if elapsed != last_timeline:
                    self.timeline.append((elapsed, round(rss / 1024, 1)))
                    last_timeline = elapsed
            hwm = proc_status_kib(self.pid, "VmHWM")
            if hwm is not None:
                self.hwm_kib = max(self.hwm_kib, hwm)
            if self.hub_pid:
                hub = proc_status_kib(self.hub_pid, "VmRSS")
                if hub is not None:
                    self.hub_max_rss_kib = max(self.hub_max_rss_kib, hub)
            self._stop.wait(self.interval_seconds)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        hwm = proc_status_kib(self.pid, "VmHWM")
        if hwm is not None:
            self.hwm_kib = max(self.hwm_kib, hwm)


def parse_strace_summary(path):
    """{syscall: calls} from `strace -c` output."""
    calls = {}
    try:
        with open(path) as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 5 and fields[-1] in SYNC_CALLS and fields[3].isdigit():
                    calls[fields[-1]] = int(fields[3])
    except OSError as error:
        raise BenchError(f"no strace summary: {error}") from error
    return calls
