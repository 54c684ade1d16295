"""Processes, hubs and mounts for the Weft integration suite.

Every resource a test starts is registered with that test's `Resources` object, and
`Resources.cleanup()` releases all of them whatever state the test left them in:
mounts are unmounted (`weft umount`, then `fusermount3 -uz`), agents and daemons are
stopped (SIGTERM, then SIGKILL), and the temporary directory is removed only when
nothing is mounted below it any more.

Modes (what the `weft` fixture yields):
- `embedded`: `weft format DIR` + `weft mount DIR MOUNTPOINT`;
- `remote`:   `weft format DIR` + `weftd serve DIR --listen 127.0.0.1:PORT`
              + `weft mount weft://127.0.0.1:PORT MOUNTPOINT`;
- `localdir`: a plain directory, no Weft at all (WEFT_TEST_TARGET=localdir). It checks
              the tests themselves against the kernel's own file system.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Deploy"))
import weft_ports  # noqa: E402
from typing import Iterable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Default chunk size of a volume formatted without --chunk-size (the Weft default).
DEFAULT_CHUNK_SIZE_BYTES = 4 * 1024 * 1024

#: Wall-clock bound for one CLI command that is expected to finish (format, status, ...).
COMMAND_TIMEOUT_S = float(os.environ.get("WEFT_COMMAND_TIMEOUT", "120"))
#: Bound for `weft mount --background` to report a usable mount.
MOUNT_TIMEOUT_S = float(os.environ.get("WEFT_MOUNT_TIMEOUT", "60"))
#: Bound for `weft umount` (it flushes everything, so allow for a big write-back buffer).
UMOUNT_TIMEOUT_S = float(os.environ.get("WEFT_UMOUNT_TIMEOUT", "180"))
#: Bound for weftd to accept connections after start.
DAEMON_START_TIMEOUT_S = 30.0

ALL_MODES = ("embedded", "remote")
#: `WEFT_TEST_LOCAL_READS=off`: remote-mode agents read file data over TCP too, not from weftd's
#: store (SPEC.md §4, Co-located reads); `Tests/run-all` runs the data tests once more so.
LOCAL_READS = os.environ.get("WEFT_TEST_LOCAL_READS", "auto").strip().lower()


# --------------------------------------------------------------------------- config

def test_target() -> str:
    """`weft` (default) or `localdir` (self-check of the suite, no Weft)."""
    value = os.environ.get("WEFT_TEST_TARGET", "weft").strip().lower()
    if value not in ("weft", "localdir"):
        raise ValueError(f"WEFT_TEST_TARGET must be 'weft' or 'localdir', not {value!r}")
    return value


def is_localdir_target() -> bool:
    return test_target() == "localdir"


def selected_modes() -> list[str]:
    """Modes every file-system test runs in."""
    if is_localdir_target():
        return ["localdir"]
    raw = os.environ.get("WEFT_TEST_MODES", ",".join(ALL_MODES))
    modes = [m.strip() for m in raw.split(",") if m.strip()]
    for m in modes:
        if m not in ALL_MODES:
            raise ValueError(f"WEFT_TEST_MODES: unknown mode {m!r} (known: {', '.join(ALL_MODES)})")
    return modes


def temp_root() -> Path:
    """Parent of all per-test directories. Every component must be searchable by others,
    because the permission tests run children as unprivileged users."""
    return Path(os.environ.get("WEFT_TEST_TMPDIR", "/tmp"))


_bin_dir_cache: Optional[Path] = None


def bin_dir() -> Path:
    """Directory holding `weft` and `weftd`: $WEFT_BIN, else `swift build -c release --show-bin-path`."""
    global _bin_dir_cache
    if _bin_dir_cache is not None:
        return _bin_dir_cache
    env = os.environ.get("WEFT_BIN")
    if env:
        _bin_dir_cache = Path(env)
        return _bin_dir_cache
    fallback = REPO_ROOT / ".build" / "release"
    try:
        out = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=90,
                             stdin=subprocess.DEVNULL)
        lines = out.stdout.strip().splitlines()
        if out.returncode == 0 and lines:
            _bin_dir_cache = Path(lines[-1].strip())
            return _bin_dir_cache
    except (OSError, subprocess.TimeoutExpired):
        pass
    _bin_dir_cache = fallback
    return _bin_dir_cache


def missing_binaries() -> list[str]:
    return [str(bin_dir() / name) for name in ("weft", "weftd")
            if not os.access(bin_dir() / name, os.X_OK)]


# --------------------------------------------------------------------------- small helpers

def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[tuple[int, str]]:
    """(mount id, mount point) of every mount, in /proc/self/mountinfo order."""
    with open("/proc/self/mountinfo", "r", encoding="utf-8", errors="surrogateescape") as f:
        rows = []
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4:
                rows.append((int(fields[0]), _unescape_mountinfo(fields[4])))
        return rows


def mount_points() -> list[str]:
    return [mp for _, mp in mount_table()]


def mount_ids_at(path: os.PathLike | str) -> list[int]:
    target = os.path.abspath(path)
    return [mid for mid, mp in mount_table() if mp == target]


def is_mounted(path: os.PathLike | str) -> bool:
    """True when `path` is a mount point. Never touches the path itself, so it does not
    hang or fail on a dead FUSE mount."""
    return os.path.abspath(path) in mount_points()


def pid_alive(pid: Optional[int]) -> bool:
    """True while `pid` runs (a zombie counts as dead: nobody may reap a daemonized agent)."""
    if not pid or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def free_loopback_port() -> int:
    """A port for a daemon to listen on (Deploy/weft_ports.py: outside the ephemeral range)."""
    return weft_ports.free_loopback_port()


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, max_bytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"


def find_key(obj, wanted: str):
    """Depth-first search of a JSON value for a key (case-insensitive); returns its value or None."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k.lower() == wanted.lower():
                return v
        for v in obj.values():
            found = find_key(v, wanted)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = find_key(v, wanted)
            if found is not None:
                return found
    return None


def find_used_bytes(obj) -> Optional[int]:
    """The 'space used' figure of `weft status --json`, whatever its exact key name
    (`storedBytes`, or a numeric key containing 'used'; one that says 'byte' first)."""
    candidates: list[tuple[int, str, int]] = []

    def walk(o, depth=0):
        if isinstance(o, dict):
            for k, v in o.items():
                lk = k.lower()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and (
                        "used" in lk or lk == "storedbytes"):
                    candidates.append((0 if "byte" in lk else 1, lk, int(v)))
                walk(v, depth + 1)
        elif isinstance(o, list):
            for v in o:
                walk(v, depth + 1)

    walk(obj)
    if not candidates:
        return None
    candidates.sort()
    return candidates[0][2]


# --------------------------------------------------------------------------- commands

def _clip(text: str, head: int = 1200, tail_chars: int = 400) -> str:
    """Start and end of a long output (a crash report's reason is at its start)."""
    text = text.strip()
    if len(text) <= head + tail_chars + 20:
        return repr(text)
    return f"{text[:head]!r} ... [{len(text) - head - tail_chars} chars] ... {text[-tail_chars:]!r}"


class CommandResult:
    """Outcome of one finished (or timed-out) command."""

    def __init__(self, argv: Sequence[str], rc: Optional[int], out: str, err: str,
                 elapsed_s: float, timed_out: bool):
        self.argv = [str(a) for a in argv]
        self.rc = rc
        self.out = out
        self.err = err
        self.elapsed_s = elapsed_s
        self.timed_out = timed_out

    @property
    def output(self) -> str:
        return (self.out + "\n" + self.err).strip()

    def describe(self) -> str:
        if self.timed_out:
            status = "TIMED OUT"
        elif self.rc is not None and self.rc < 0:
            status = f"KILLED BY SIGNAL {-self.rc} ({signal.Signals(-self.rc).name})"
        else:
            status = f"exit {self.rc}"
        return (f"$ {' '.join(self.argv)}\n  -> {status} after {self.elapsed_s:.1f}s\n"
                f"  stdout: {_clip(self.out)}\n  stderr: {_clip(self.err)}")

    def __repr__(self) -> str:
        return self.describe()


class Resources:
    """Everything one test started; `cleanup()` releases all of it."""

    _live: "set[Resources]" = set()
    _live_lock = threading.Lock()

    def __init__(self, test_name: str):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)[:48]
        root = temp_root()
        root.mkdir(parents=True, exist_ok=True)
        self.base = Path(tempfile.mkdtemp(prefix=f"weft-it-{safe}-", dir=root))
        os.chmod(self.base, 0o755)
        self.log_dir = self.base / "logs"
        self.log_dir.mkdir()
        self.mounts: list[Mount] = []
        self.daemons: list[Weftd] = []
        self.running: set[subprocess.Popen] = set()
        self.warnings: list[str] = []
        self.watchdog_fired = False
        self._counter = 0
        self._lock = threading.Lock()
        with Resources._live_lock:
            Resources._live.add(self)

    def next_id(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def new_dir(self, name: str, mode: int = 0o755) -> Path:
        path = self.base / name
        path.mkdir()
        os.chmod(path, mode)
        return path

    # -- running commands -----------------------------------------------------------

    def run(self, argv: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S,
            env: Optional[dict] = None) -> CommandResult:
        """Runs a command to completion with output in files (never pipes: a daemonizing
        child would hold a pipe open forever). On timeout the whole process group dies."""
        n = self.next_id()
        out_path = self.log_dir / f"cmd{n:03d}.out"
        err_path = self.log_dir / f"cmd{n:03d}.err"
        start = time.monotonic()
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                    stdout=out_f, stderr=err_f, start_new_session=True,
                                    env=env)
        self.running.add(proc)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            rc = proc.returncode
        finally:
            self.running.discard(proc)
        elapsed = time.monotonic() - start
        result = CommandResult(argv, rc, out_path.read_text("utf-8", "replace"),
                               err_path.read_text("utf-8", "replace"), elapsed, timed_out)
        with open(self.log_dir / "commands.log", "a") as log:
            log.write(result.describe() + "\n")
        return result

    # -- releasing --------------------------------------------------------------------

    def emergency_stop(self, reason: str) -> None:
        """Kills everything at once (watchdog): unblocks a test hung in a FUSE syscall."""
        self.watchdog_fired = True
        sys.stderr.write(f"\n[weft-it] WATCHDOG: {reason}; killing agents, daemons and commands\n")
        for proc in list(self.running):
            _kill_group(proc.pid)
        for m in list(self.mounts):
            m.kill_agent()
        for d in list(self.daemons):
            d.kill9()
        for m in list(self.mounts):
            m.lazy_unmount()

    def cleanup(self, keep_dir: bool = False) -> list[str]:
        """Releases everything; returns problems that could not be fixed (still mounted,
        process survived SIGKILL). Soft problems go to `self.warnings`."""
        problems: list[str] = []
        for proc in list(self.running):
            _kill_group(proc.pid)
        for m in reversed(self.mounts):
            try:
                m.release()
            except Exception as e:  # keep releasing the rest
                problems.append(f"releasing mount {m.mountpoint}: {e!r}")
        for d in reversed(self.daemons):
            try:
                d.stop()
            except Exception as e:
                problems.append(f"stopping weftd on port {d.port}: {e!r}")
        for m in self.mounts:
            if m.active:
                problems.append(f"{m.mountpoint} is still mounted after cleanup")
            if pid_alive(m.last_pid):
                problems.append(f"agent pid {m.last_pid} survived SIGKILL")
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                problems.append(f"weftd pid {d.proc.pid} survived SIGKILL")
        still_mounted = [p for p in mount_points() if p.startswith(str(self.base) + "/")]
        if still_mounted:
            problems.append(f"not removing {self.base}: still mounted below it: {still_mounted}")
        elif not keep_dir and os.environ.get("WEFT_KEEP_TMP") != "1":
            shutil.rmtree(self.base, ignore_errors=True)
        with Resources._live_lock:
            Resources._live.discard(self)
        return problems

    @classmethod
    def cleanup_all_live(cls) -> None:
        with cls._live_lock:
            live = list(cls._live)
        for res in live:
            res.cleanup()

    def log_tails(self) -> str:
        parts = []
        for d in self.daemons:
            parts.append(f"--- weftd log {d.log_path} ---\n{tail(d.log_path)}")
        for m in self.mounts:
            for p in m.log_paths:
                if p.exists():
                    parts.append(f"--- agent log {p} ---\n{tail(p)}")
        parts.append(f"--- commands ---\n{tail(self.log_dir / 'commands.log', 6000)}")
        return "\n".join(parts)


def _kill_group(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError, OSError):
            pass


def lazy_unmount(path: os.PathLike | str) -> None:
    """`fusermount3 -uz`, then `umount -l`, until `path` is no longer a mount point."""
    for _ in range(8):
        if not is_mounted(path):
            return
        for argv in (["fusermount3", "-uz", str(path)], ["umount", "-l", str(path)]):
            try:
                subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            if not is_mounted(path):
                return


# --------------------------------------------------------------------------- CLI

class WeftCLI:
    """The two binaries, run through a test's `Resources` (logged, bounded)."""

    def __init__(self, res: Resources, binaries: Optional[Path] = None):
        self.res = res
        self.bin_dir = binaries or bin_dir()

    @property
    def weft_path(self) -> Path:
        return self.bin_dir / "weft"

    @property
    def weftd_path(self) -> Path:
        return self.bin_dir / "weftd"

    def weft(self, *args, timeout_s: float = COMMAND_TIMEOUT_S,
             env: Optional[dict] = None) -> CommandResult:
        """`env`: variables added to this process's environment for the command."""
        return self.res.run([self.weft_path, *map(str, args)], timeout_s=timeout_s,
                            env={**os.environ, **env} if env else None)

    def weftd(self, *args, timeout_s: float = COMMAND_TIMEOUT_S) -> CommandResult:
        return self.res.run([self.weftd_path, *map(str, args)], timeout_s=timeout_s)

    def format(self, hub_dir: Path, *options) -> CommandResult:
        r = self.weft("format", hub_dir, *options)
        assert r.rc == 0 and not r.timed_out, f"weft format failed:\n{r.describe()}"
        return r

    def status_json(self, source: str) -> dict:
        r = self.weft("status", source, "--json")
        assert r.rc == 0 and not r.timed_out, f"weft status failed:\n{r.describe()}"
        try:
            return json.loads(r.out)
        except json.JSONDecodeError as e:
            raise AssertionError(f"weft status --json printed invalid JSON ({e}):\n{r.describe()}")


# --------------------------------------------------------------------------- weftd

class Weftd:
    """One `weftd serve DIR --listen 127.0.0.1:PORT` process (foreground child)."""

    def __init__(self, res: Resources, cli: WeftCLI, hub_dir: Path, port: int, extra_args: Sequence[str] = ()):
        self.res = res
        self.cli = cli
        self.hub_dir = hub_dir
        self.port = port
        self.extra_args = [str(a) for a in extra_args]
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        self.log_path = res.log_dir / f"weftd-{port}.log"
        res.daemons.append(self)

    @property
    def url(self) -> str:
        return f"weft://127.0.0.1:{self.port}"

    def spawn(self) -> subprocess.Popen:
        """Starts the process without waiting for it to listen."""
        assert self.proc is None or self.proc.poll() is not None, "weftd already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"=== start #{self.starts} at {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(self.cli.weftd_path), "serve", str(self.hub_dir), "--listen",
                 f"127.0.0.1:{self.port}", *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        return self.proc

    def start(self) -> None:
        """Starts weftd and waits until it accepts connections."""
        self.spawn()
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"weftd exited with {self.proc.returncode} during start-up:\n"
                                     f"{tail(self.log_path)}")
            if port_accepts(self.port):
                return
            time.sleep(0.05)
        raise AssertionError(f"weftd did not accept connections on port {self.port} within "
                             f"{DAEMON_START_TIMEOUT_S}s:\n{tail(self.log_path)}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc.pid)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def stop(self, timeout_s: float = 20.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after `timeout_s`. Returns the exit status. A weftd that was
        running and answers SIGTERM with anything but a clean exit (status 0) is a failure: a
        crash while it closes the volume (a clean close checkpoints the metadata and drops the
        lease marker) would otherwise go unnoticed."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.res.warnings.append(f"weftd on port {self.port} ignored SIGTERM for "
                                         f"{timeout_s}s; killed")
                self.kill9()
                return self.proc.returncode
            if self.proc.returncode != 0:
                raise AssertionError(f"weftd on port {self.port} exited with {self.proc.returncode} after "
                                     f"SIGTERM (a clean stop exits 0):\n{tail(self.log_path)}")
        return self.proc.returncode


# --------------------------------------------------------------------------- mounts

class MountError(AssertionError):
    def __init__(self, result: CommandResult, message: str):
        super().__init__(f"{message}\n{result.describe()}")
        self.result = result


class Mount:
    """One `weft mount SOURCE MOUNTPOINT --background --pid-file PATH`.

    The mount is identified by its kernel mount id, so releasing it never touches another
    mount on the same mount point (a test may stack one on purpose)."""

    def __init__(self, res: Resources, cli: WeftCLI, source: str, mountpoint: Path,
                 options: Iterable[str] = (), env: Optional[dict] = None):
        self.res = res
        self.cli = cli
        self.source = source
        self.mountpoint = Path(mountpoint)
        self.options = list(options)
        self.env = env
        n = res.next_id()
        self.pid_file = res.base / f"agent-{n}.pid"
        self.log_file = res.log_dir / f"agent-{n}.log"
        self.last_pid: Optional[int] = None
        self.mount_ids: list[int] = []
        self.left_mounted = False
        self.log_paths: list[Path] = [self.log_file]
        res.mounts.append(self)

    def start(self, timeout_s: float = MOUNT_TIMEOUT_S) -> CommandResult:
        """Runs `weft mount --background`; raises MountError unless it exits 0 with a new
        mount in place and a pid in the pid file."""
        r = self.try_start(timeout_s)
        if r.timed_out or r.rc != 0:
            raise MountError(r, f"weft mount {self.source} {self.mountpoint} failed")
        if not self.mount_ids:
            raise MountError(r, f"weft mount returned 0 but no new mount appeared at {self.mountpoint}")
        if not wait_until(lambda: self._remember_pid() is not None, 10):
            raise MountError(r, f"weft mount returned 0 but wrote no pid to {self.pid_file}")
        return r

    def try_start(self, timeout_s: float = MOUNT_TIMEOUT_S) -> CommandResult:
        """Runs `weft mount --background` and records whatever it mounted; no assertions."""
        try:
            self.pid_file.unlink()
        except FileNotFoundError:
            pass
        before = set(mount_ids_at(self.mountpoint))
        r = self.cli.weft("mount", self.source, self.mountpoint, "--background",
                          "--pid-file", self.pid_file, "--log-file", self.log_file,
                          *self.options, timeout_s=timeout_s, env=self.env)
        self.mount_ids = [i for i in mount_ids_at(self.mountpoint) if i not in before]
        self._remember_pid()
        return r

    def _remember_pid(self) -> Optional[int]:
        try:
            text = self.pid_file.read_text().strip()
            pid = int(text) if text else None
        except (OSError, ValueError):
            pid = None
        if pid:
            self.last_pid = pid
        return pid

    @property
    def active(self) -> bool:
        """True while this mount is in the mount table. Once seen gone it stays gone: the
        kernel recycles mount ids, and a later mount on the same path may get this one's."""
        if not self.mount_ids:
            return False
        mp = os.path.abspath(self.mountpoint)
        current = {mid for mid, path in mount_table() if path == mp}
        if not any(mid in current for mid in self.mount_ids):
            self.mount_ids = []
            return False
        return True

    @property
    def agent_pid(self) -> Optional[int]:
        return self._remember_pid() or self.last_pid

    def kill_agent(self, sig: int = signal.SIGKILL) -> Optional[int]:
        pid = self.agent_pid
        if pid and pid_alive(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pid

    def lazy_unmount(self) -> None:
        """`fusermount3 -uz` (then `umount -l`) until this mount is gone."""
        for _ in range(8):
            if not self.active:
                return
            for argv in (["fusermount3", "-uz", str(self.mountpoint)],
                         ["umount", "-l", str(self.mountpoint)]):
                try:
                    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                if not self.active:
                    return

    def umount(self) -> CommandResult:
        """`weft umount`; the caller asserts on the result. Forces the rest if needed."""
        pid = self.agent_pid
        r = self.cli.weft("umount", self.mountpoint, timeout_s=UMOUNT_TIMEOUT_S)
        self.left_mounted = self.active
        if r.rc == 0 and not r.timed_out:
            if self.left_mounted:
                self.res.warnings.append(f"weft umount {self.mountpoint} exited 0 but the mount "
                                         "is still there")
            if pid and not wait_until(lambda: not pid_alive(pid), 30):
                self.res.warnings.append(f"agent pid {pid} still running 30s after weft umount")
        self.release(try_clean_umount=False)
        return r

    def release(self, try_clean_umount: bool = True) -> None:
        """Makes sure nothing of this mount remains (idempotent)."""
        pid = self.agent_pid
        if try_clean_umount and self.active and pid_alive(pid):
            r = self.cli.weft("umount", self.mountpoint, timeout_s=UMOUNT_TIMEOUT_S)
            if r.rc != 0 or r.timed_out:
                self.res.warnings.append(f"teardown: weft umount {self.mountpoint} failed "
                                         f"(exit {r.rc}, timed out {r.timed_out}): "
                                         f"{r.output[-300:]}")
            elif pid:
                wait_until(lambda: not pid_alive(pid), 15)
        if pid and pid_alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not wait_until(lambda: not pid_alive(pid), 10):
                self.kill_agent(signal.SIGKILL)
                wait_until(lambda: not pid_alive(pid), 10)
        self.lazy_unmount()


# --------------------------------------------------------------------------- the file system under test

class WeftFS:
    """A mounted Weft volume (or, in localdir mode, a plain directory).

    `path` is where tests do their system calls. `remount()` makes the data go through
    a full unmount (flush) and a fresh agent; in localdir mode it is a no-op.
    """

    def __init__(self, res: Resources, mode: str, format_args: Sequence[str] = (),
                 mount_args: Sequence[str] = (), name: str = "fs", hub_args: Sequence[str] = ()):
        """`hub_args`: options of the hub, given to weftd (remote) or to the mount that embeds
        the hub (embedded)."""
        self.res = res
        self.mode = mode
        self.format_args = [str(a) for a in format_args]
        self.hub_args = [str(a) for a in hub_args]
        self.mount_args = [str(a) for a in mount_args]
        if mode == "embedded":
            self.mount_args += self.hub_args
        if mode == "remote" and LOCAL_READS == "off" and "--local-reads" not in self.mount_args:
            self.mount_args += ["--local-reads", "off"]
        self.name = name
        self.chunk_size = DEFAULT_CHUNK_SIZE_BYTES
        if "--chunk-size" in self.format_args:
            self.chunk_size = int(self.format_args[self.format_args.index("--chunk-size") + 1])
        self.cli: Optional[WeftCLI] = None
        self.hub_dir: Optional[Path] = None
        self.daemon: Optional[Weftd] = None
        self.mount_obj: Optional[Mount] = None
        self.extra_mounts: list[Mount] = []
        self.path: Path = Path("/nonexistent")

    # -- set-up -----------------------------------------------------------------------

    @property
    def is_weft(self) -> bool:
        return self.mode != "localdir"

    @property
    def source(self) -> str:
        if self.mode == "remote":
            assert self.daemon is not None
            return self.daemon.url
        return str(self.hub_dir)

    def setup(self) -> "WeftFS":
        if self.mode == "localdir":
            self.path = self.res.new_dir(f"{self.name}-local", 0o755)
            return self
        self.cli = WeftCLI(self.res)
        self.hub_dir = self.res.base / f"{self.name}-hub"
        self.cli.format(self.hub_dir, *self.format_args)
        if self.mode == "remote":
            self.daemon = Weftd(self.res, self.cli, self.hub_dir, free_loopback_port(), self.hub_args)
            self.daemon.start()
        self.path = self.res.new_dir(f"{self.name}-mnt", 0o755)
        self.mount()
        return self

    def require_weft(self, why: str = "needs Weft itself") -> None:
        import pytest
        if not self.is_weft:
            pytest.skip(f"localdir self-check: {why}")

    def require_mode(self, *modes: str) -> None:
        import pytest
        if self.mode not in modes:
            pytest.skip(f"only in mode(s) {', '.join(modes)}")

    # -- mount life cycle -----------------------------------------------------------------

    def mount(self, extra_args: Sequence[str] = ()) -> None:
        if not self.is_weft:
            return
        assert self.cli is not None
        self.mount_obj = Mount(self.res, self.cli, self.source, self.path,
                               [*self.mount_args, *extra_args])
        self.mount_obj.start()

    def unmount(self) -> None:
        """`weft umount`; asserts it succeeds and leaves nothing mounted."""
        if not self.is_weft or self.mount_obj is None:
            return
        r = self.mount_obj.umount()
        m_left = self.mount_obj.left_mounted
        self.mount_obj = None
        assert r.rc == 0 and not r.timed_out, f"weft umount failed:\n{r.describe()}"
        assert not m_left, f"weft umount {self.path} exited 0 but the mount was still there"

    def remount(self) -> None:
        if not self.is_weft:
            return
        self.unmount()
        self.mount()

    def add_agent(self, name: str, options: Sequence[str] = (), env: Optional[dict] = None) -> Path:
        """A second agent (mount) on the same volume, its process given `env` besides this
        one's environment; returns its mount point."""
        assert self.is_weft and self.cli is not None
        mountpoint = self.res.new_dir(name, 0o755)
        m = Mount(self.res, self.cli, self.source, mountpoint, [*self.mount_args, *options], env=env)
        m.start()
        self.extra_mounts.append(m)
        return mountpoint

    @property
    def agent_pid(self) -> Optional[int]:
        return self.mount_obj.agent_pid if self.mount_obj else None

    # -- hub life cycle (remote mode) ---------------------------------------------------

    def stop_hub(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()

    def start_hub(self) -> None:
        if self.daemon is not None and not self.daemon.alive:
            self.daemon.start()

    def offline(self):
        """Context manager: everything stopped (no agent, no weftd) inside, restarted after."""
        fs = self

        class _Offline:
            def __enter__(self_inner):
                fs.unmount()
                fs.stop_hub()
                return fs

            def __exit__(self_inner, *exc):
                fs.start_hub()
                fs.mount()
                return False

        return _Offline()

    # -- admin commands -------------------------------------------------------------------

    def status(self) -> dict:
        """`weft status SOURCE --json` against the live volume."""
        assert self.cli is not None
        return self.cli.status_json(self.source)

    def status_any(self) -> dict:
        """Live status; in embedded mode, if the hub directory cannot be queried while it is
        mounted, the offline status (with a warning in the test report)."""
        assert self.cli is not None
        r = self.cli.weft("status", self.source, "--json")
        if r.rc == 0 and not r.timed_out:
            try:
                return json.loads(r.out)
            except json.JSONDecodeError as e:
                raise AssertionError(f"weft status --json printed invalid JSON ({e}):\n{r.describe()}")
        if self.mode != "embedded" or r.timed_out or (r.rc is not None and r.rc < 0):
            raise AssertionError(f"weft status failed:\n{r.describe()}")
        self.res.warnings.append("weft status HUB_DIR fails while the hub is mounted (embedded); "
                                 f"used an offline status instead: {r.output[:300]}")
        return self.status_offline()

    def status_offline(self) -> dict:
        """`weft status HUB_DIR --json` with everything stopped, then restarted."""
        with self.offline():
            return self.cli.status_json(str(self.hub_dir))

    def fsck(self, *options, source: Optional[str] = None) -> CommandResult:
        assert self.cli is not None
        return self.cli.weft("fsck", source or self.source, *options, timeout_s=600)

    def fsck_offline(self, *options) -> CommandResult:
        """`weft fsck HUB_DIR` with no agent and no weftd running; restarts them after."""
        with self.offline():
            return self.fsck(*options, source=str(self.hub_dir))
