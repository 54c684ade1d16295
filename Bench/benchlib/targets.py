"""The systems under test. Each target can be set up, mounted, made cold, unmounted and torn down.

Every target lives in WORK/<name>/ with mnt/ (the mountpoint) and its own data, cache and
log files. Mounting registers a cleanup action that unmounts and stops the processes the
target started, so an interrupted run leaves nothing mounted or running.

"Cold" means: the kernel page cache, dentries and inodes are dropped, and the file system
is remounted (its services restarted where they hold caches) so that its own caches are
empty too. memfs and local cannot be remounted without losing the data (memfs) or have
nothing to remount (local), so for them cold is the page-cache drop alone.
"""

import json
import os
import signal
import time

from .system import (BenchError, Cleanup, drop_caches, force_unmount, free_loopback_port, is_mounted,
                     pids_with_argument, read_pid_file, run, start_daemon, stop_daemon, stop_pids, unmount_with,
                     wait_for_mount, wait_for_port, wait_pids_exit)

DATA_FAMILIES = ("seqwrite", "seqread", "randread", "metadata", "smallfiles", "fsync")
ALL_FAMILIES = DATA_FAMILIES + ("rss",)  # rss: the agent's memory bound, Weft only


class TargetUnavailable(Exception):
    """The target cannot run here (a binary is missing); the message goes in the report."""


class Target:
    """Base class: a plain directory that needs no mount. Subclasses override the hooks."""

    name = "target"
    description = ""
    families = DATA_FAMILIES
    cold_remounts = True

    def __init__(self, context):
        self.context = context
        self.root = os.path.join(context.work_dir, self.name)
        self.mountpoint = os.path.join(self.root, "mnt")
        self.log_path = os.path.join(context.log_dir, f"{self.name}.log")
        self.mounted = False
        self._mount_cleanup = None
        self.info = {}

    # --- hooks -------------------------------------------------------------------------------
    def check_available(self):
        """Raises TargetUnavailable when this target cannot run here."""

    def setup(self):
        os.makedirs(self.mountpoint, exist_ok=True)

    def mount(self, extra_args=()):
        self.mounted = True

    def unmount(self):
        self.mounted = False

    def clear_own_caches(self):
        """Empties caches the file system keeps on disk between mounts (called while unmounted)."""

    def teardown(self):
        if self.mounted:
            self.unmount()

    def agent_pid(self):
        """Pid of the process that serves the mount, when the target knows it."""
        return None

    def server_pids(self):
        """Every process that serves this file system (for the durability probe); [] for the kernel."""
        return []

    # --- shared ------------------------------------------------------------------------------
    def make_cold(self):
        if self.cold_remounts:
            self.unmount()
            self.clear_own_caches()
            drop_caches()
            self.mount()
        else:
            drop_caches()

    def settle(self):
        """Waits until the file system has finished what earlier work left to do in the background,
        so that it does not slow the next timed loop: dirty pages written (`sync`, every target);
        returns the seconds waited beyond that, if any."""
        os.sync()
        return 0.0

    def make_cold_running(self):
        """Empties the data caches without restarting the file system's process. Only Weft can
        (`weft cache drop`); the others go cold as in `make_cold`."""
        self.make_cold()

    def is_healthy(self):
        return is_mounted(self.mountpoint)

    def _register_mount_cleanup(self, extra_pids_fn=None):
        mountpoint = self.mountpoint

        def undo():
            force_unmount(mountpoint)
            pids = pids_with_argument(mountpoint) + (extra_pids_fn() if extra_pids_fn else [])
            stop_pids(pids)
        self._mount_cleanup = Cleanup.add(f"unmount {mountpoint}", undo)

    def _forget_mount_cleanup(self):
        Cleanup.remove(self._mount_cleanup)
        self._mount_cleanup = None


class LocalTarget(Target):
    name = "local"
    description = "plain directory on the same disk as the other targets' data (no FUSE)"
    cold_remounts = False

    def is_healthy(self):
        return os.path.isdir(self.mountpoint)


class MemfsTarget(Target):
    name = "memfs"
    description = ("minimal memory-backed libfuse3 file system (Bench/memfs), memory touched before mounting: "
                   "the FUSE ceiling")
    cold_remounts = False  # a remount would lose the data

    def __init__(self, context):
        super().__init__(context)
        self.process = None

    def mount(self, extra_args=()):
        prefault_mib = self.context.memfs_prefault_mib
        command = [self.context.memfs_path, self.mountpoint, "-f", "-o", "fsname=memfs,subtype=memfs",
                   f"--prefault-mb={prefault_mib}", *extra_args]
        self.process = start_daemon(command, self.log_path)
        self._register_mount_cleanup()
        timeout = self.context.mount_timeout + prefault_mib / 100  # touching memory first: >= 100 MiB/s
        wait_for_mount(self.mountpoint, timeout, self.process, self.log_path, "memfs")
        self.info["prefault_mib"] = prefault_mib
        self.mounted = True

    def unmount(self):
        force_unmount(self.mountpoint)
        if self.process:
            try:
                self.process.wait(timeout=15)
            except Exception:
                pass
            stop_daemon(self.process)
            self.process = None
        self._forget_mount_cleanup()
        self.mounted = False

    def agent_pid(self):
        return self.process.pid if self.process else None

    def server_pids(self):
        return [self.process.pid] if self.process else []


class RedisServer:
    """A redis-server on a free loopback port with its own directory; default durability
    (appendonly no, the built-in RDB save schedule)."""

    def __init__(self, directory, log_path, timeout_seconds):
        self.directory = directory
        self.log_path = log_path
        self.timeout_seconds = timeout_seconds
        self.process = None
        self.port = None

    def start(self):
        os.makedirs(self.directory, exist_ok=True)
        self.port = free_loopback_port()
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory,
                   "--daemonize", "no", "--appendonly", "no", "--logfile", ""]
        self.process = start_daemon(command, self.log_path)
        wait_for_port(self.port, self.timeout_seconds, self.process, self.log_path, "redis-server")

    def stop(self):
        if self.process:
            stop_daemon(self.process)
            self.process = None


class JuiceFSTarget(Target):
    """JuiceFS with --storage file and SQLite or Redis metadata, default mount options except
    cache dir and log in the benchmark's work dir, no usage report, trash disabled.

    `sync_metadata` runs SQLite with synchronous=FULL: every metadata transaction is synced
    before it returns, the durability of Weft's strict mode (JuiceFS's default SQLite syncs only
    at WAL checkpoints)."""

    def __init__(self, context, metadata, sync_metadata=False, families=DATA_FAMILIES):
        self.name = f"juicefs-{metadata}" + ("-sync" if sync_metadata else "")
        if sync_metadata:
            self.description = ("JuiceFS, local-directory storage, SQLite metadata with synchronous=FULL "
                                "(a sync per metadata transaction); metadata workloads only")
        else:
            self.description = (f"JuiceFS, local-directory storage, {'SQLite' if metadata == 'sqlite' else 'Redis'} "
                                "metadata, default options")
        super().__init__(context)
        self.metadata = metadata
        self.sync_metadata = sync_metadata
        self.families = families
        self.bucket = os.path.join(self.root, "bucket")
        self.cache_dir = os.path.join(self.root, "cache")
        self.juicefs_log = os.path.join(self.root, "juicefs.log")
        self.redis = None
        self.meta_url = None

    def check_available(self):
        if not self.context.juicefs_path:
            raise TargetUnavailable("juicefs binary not available")

    def setup(self):
        super().setup()
        os.makedirs(self.bucket, exist_ok=True)
        os.makedirs(self.cache_dir, exist_ok=True)
        if self.metadata == "sqlite":
            self.meta_url = f"sqlite3://{os.path.join(self.root, 'meta.db')}"
            if self.sync_metadata:
                self.meta_url += "?_synchronous=FULL"
        else:
            self.redis = RedisServer(os.path.join(self.root, "redis"),
                                     os.path.join(self.context.log_dir, f"{self.name}-redis.log"),
                                     self.context.mount_timeout)
            self.redis.start()
            self.meta_url = f"redis://127.0.0.1:{self.redis.port}/1"
        run([self.context.juicefs_path, "format", "--storage", "file", "--bucket", self.bucket + "/",
             "--trash-days", "0", self.meta_url, "bench"], 120, log_path=self.log_path)
        self.info.update(meta_url=self.meta_url, storage=f"file://{self.bucket}/",
                         mount_args=self._mount_args())

    def _juicefs_pids(self):
        """juicefs rewrites its argv into one string cut to the original length, so the mountpoint
        (last) may be missing: match the log path (first) and cache dir as well."""
        found = set()
        for argument in (self.juicefs_log, self.cache_dir, self.mountpoint):
            found.update(pids_with_argument(argument))
        return sorted(found)

    def _mount_args(self):
        return ["--no-usage-report", "--log", self.juicefs_log,
                "--cache-dir", self.cache_dir, *self.context.juicefs_mount_args]

    def mount(self, extra_args=()):
        self._register_mount_cleanup(self._juicefs_pids)
        run([self.context.juicefs_path, "mount", "-d", *self._mount_args(), *extra_args,
             self.meta_url, self.mountpoint], self.context.mount_timeout + 30, log_path=self.log_path)
        wait_for_mount(self.mountpoint, self.context.mount_timeout, None, self.log_path, self.name)
        self.mounted = True

    def unmount(self):
        pids = self._juicefs_pids()
        unmount_with([self.context.juicefs_path, "umount", self.mountpoint], self.mountpoint, self.log_path)
        if not wait_pids_exit(pids, 30):
            stop_pids(pids)
        self._forget_mount_cleanup()
        self.mounted = False

    def clear_own_caches(self):
        run(["rm", "-rf", "--one-file-system", self.cache_dir], 600, check=False)
        os.makedirs(self.cache_dir, exist_ok=True)

    def agent_pid(self):
        pids = self._juicefs_pids()
        return max(pids) if pids else None  # the worker is the supervisor's child

    def server_pids(self):
        redis = [self.redis.process.pid] if self.redis and self.redis.process else []
        return self._juicefs_pids() + redis

    def teardown(self):
        super().teardown()
        if self.redis:
            self.redis.stop()


class WeftTarget(Target):
    """Weft through its CLI: embedded (hub in the agent) or remote (weftd on loopback)."""

    def __init__(self, context, name, remote=False, durability=None, families=ALL_FAMILIES, description="",
                 mount_options=()):
        self.name = name
        self.mount_options = list(mount_options)
        self.description = description
        self.families = families
        super().__init__(context)
        self.remote = remote
        self.durability = durability
        self.data_dir = os.path.join(self.root, "data")
        self.pid_file = os.path.join(self.root, "agent.pid")
        self.hub = None
        self.hub_port = None
        self._agent_pid = None

    def check_available(self):
        if not self.context.weft_path:
            raise TargetUnavailable(self.context.weft_missing_note or "weft binary not found")
        if self.remote and not self.context.weftd_path:
            raise TargetUnavailable(f"weftd binary not found next to {self.context.weft_path}")

    def setup(self):
        super().setup()
        run([self.context.weft_path, "format", self.data_dir, "--compression", self.context.weft_compression],
            120, log_path=self.log_path)
        try:
            status = run([self.context.weft_path, "status", self.data_dir, "--json"], 30)
            self.info["status_after_format"] = status.stdout.strip()[:4000]
        except BenchError as error:
            self.info["status_after_format"] = f"unavailable: {str(error)[:300]}"
        if self.remote:
            self._start_hub()
        self.info.update(source=self._source(), compression=self.context.weft_compression,
                         durability=self.durability or "strict (default)",
                         mount_args=list(self.context.weft_mount_args) + self.mount_options)

    def _source(self):
        return f"weft://127.0.0.1:{self.hub_port}" if self.remote else self.data_dir

    def _start_hub(self):
        self.hub_port = free_loopback_port()
        command = [self.context.weftd_path, "serve", self.data_dir, "--listen", f"127.0.0.1:{self.hub_port}"]
        if self.durability:
            command += ["--durability", self.durability]
        hub_log = os.path.join(self.context.log_dir, f"{self.name}-weftd.log")
        self.hub = start_daemon(command, hub_log)
        wait_for_port(self.hub_port, self.context.mount_timeout, self.hub, hub_log, "weftd")

    def _stop_hub(self):
        if self.hub:
            stop_daemon(self.hub, grace_seconds=30)
            self.hub = None

    #: Weft deletes the objects of removed files in the background (GC, SPEC.md §3): wait until
    #: the chunk count has not changed for this many polls, at most SETTLE_MAX_S.
    SETTLE_STABLE_POLLS = 3
    SETTLE_POLL_S = 0.5
    SETTLE_MAX_S = 60.0

    def _chunk_count(self):
        status = run([self.context.weft_path, "status", self._source(), "--json"], 30)
        return json.loads(status.stdout)["chunks"]

    def settle(self):
        super().settle()
        started = time.monotonic()
        stable, last = 0, None
        while stable < self.SETTLE_STABLE_POLLS and time.monotonic() - started < self.SETTLE_MAX_S:
            count = self._chunk_count()
            stable = stable + 1 if count == last else 0
            last = count
            if stable < self.SETTLE_STABLE_POLLS:
                time.sleep(self.SETTLE_POLL_S)
        os.sync()
        return time.monotonic() - started

    def make_cold_running(self):
        # The agent keeps running (and keeps its memory): its block cache and the page cache go,
        # and so does weftd's read cache (SIGUSR1, SPEC.md §4, Hub read cache).
        run([self.context.weft_path, "cache", "drop", self.mountpoint], 60, log_path=self.log_path)
        if self.remote and self.hub and self._hub_has_read_cache():
            hub_log = os.path.join(self.context.log_dir, f"{self.name}-weftd.log")
            before = self._count_in(hub_log, "read cache dropped")
            self.hub.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while self._count_in(hub_log, "read cache dropped") == before:
                if time.monotonic() > deadline:
                    raise BenchError(f"weftd did not log 'read cache dropped' within 10 s of SIGUSR1 ({hub_log})")
                time.sleep(0.05)
        drop_caches()

    def _hub_has_read_cache(self):
        """Whether this weftd has a read cache that SIGUSR1 empties (an older one dies of it)."""
        if not hasattr(self, "_read_cache_known"):
            help_text = run([self.context.weftd_path, "serve", "--help"], 30, check=False)
            self._read_cache_known = "--read-cache-mb" in (help_text.stdout or "") + (help_text.stderr or "")
        return self._read_cache_known

    @staticmethod
    def _count_in(path, text):
        try:
            with open(path, "r", errors="replace") as handle:
                return handle.read().count(text)
        except FileNotFoundError:
            return 0

    def mount(self, extra_args=()):
        try:
            os.unlink(self.pid_file)
        except FileNotFoundError:
            pass
        command = [self.context.weft_path, "mount", self._source(), self.mountpoint, "--background",
                   "--pid-file", self.pid_file]
        if self.durability and not self.remote:
            command += ["--durability", self.durability]
        if "--log-file" in self.context.weft_mount_help:
            command += ["--log-file", os.path.join(self.context.log_dir, f"{self.name}-agent.log")]
        command += [*self.context.weft_mount_args, *self.mount_options, *extra_args]
        self._register_mount_cleanup(lambda: [self._agent_pid] if self._agent_pid else [])
        started = time.monotonic()
        run(command, self.context.mount_timeout + 30, log_path=self.log_path)
        wait_for_mount(self.mountpoint, self.context.mount_timeout, None, self.log_path, self.name)
        self._agent_pid = read_pid_file(self.pid_file)
        if self._agent_pid is None:
            candidates = pids_with_argument(self.mountpoint)
            self._agent_pid = max(candidates) if candidates else None
        self.info["last_mount_seconds"] = round(time.monotonic() - started, 3)
        self.mounted = True

    def unmount(self):
        pid = self._agent_pid
        unmount_with([self.context.weft_path, "umount", self.mountpoint], self.mountpoint, self.log_path,
                     timeout_seconds=120)  # weft umount commits buffered data first
        pids = ([pid] if pid else []) + pids_with_argument(self.mountpoint)
        if not wait_pids_exit(pids, 30):
            stop_pids(pids)
        self._forget_mount_cleanup()
        self._agent_pid = None
        self.mounted = False

    def clear_own_caches(self):
        if self.remote:  # the hub's caches go cold with a restart
            self._stop_hub()
            drop_caches()
            self._start_hub()

    def agent_pid(self):
        return self._agent_pid

    def hub_pid(self):
        return self.hub.pid if self.hub else None

    def server_pids(self):
        return [pid for pid in (self._agent_pid, self.hub_pid()) if pid]

    def teardown(self):
        super().teardown()
        self._stop_hub()


def make_targets(context):
    """All targets in report order."""
    return [
        LocalTarget(context),
        MemfsTarget(context),
        JuiceFSTarget(context, "sqlite"),
        JuiceFSTarget(context, "sqlite", sync_metadata=True, families=("metadata",)),
        JuiceFSTarget(context, "redis"),
        WeftTarget(context, "weft-embedded",
                   description="Weft, hub in the agent process (`weft mount DIR`), strict durability"),
        WeftTarget(context, "weft-remote", remote=True,
                   description="Weft agent + weftd hub on loopback (`weft mount weft://…`), strict durability"),
        WeftTarget(context, "weft-remote-tcp", remote=True, families=("seqwrite", "seqread", "randread"),
                   mount_options=["--local-reads", "off"],
                   description="weft-remote with `--local-reads off`: file data read and written over loopback TCP "
                               "rather than in the store weftd hands a co-located agent (SPEC.md §4, Co-located reads "
                               "and writes); data workloads only, to show what the network path gives"),
        WeftTarget(context, "weft-embedded-relaxed", durability="periodic",
                   families=("metadata", "smallfiles", "fsync"),
                   description="Weft embedded with `--durability periodic` (WAL synced once a second); "
                               "metadata-class workloads only, for the JuiceFS+Redis comparison"),
    ]


TARGET_NAMES = ("local", "memfs", "juicefs-sqlite", "juicefs-sqlite-sync", "juicefs-redis", "weft-embedded", "weft-remote",
                "weft-remote-tcp", "weft-embedded-relaxed")
