"""Process, mount and cache helpers with bounded waits, plus the cleanup registry.

Every child the benchmark starts is registered here, and `Cleanup.run_all()` (called
from a `finally`, atexit and the signal handlers) unmounts what is mounted and stops
what is running, in reverse order of registration. Nothing here kills a process it
did not start: daemons that fork are found by their unique mountpoint path.
"""

import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "Deploy"))
import weft_ports  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


class BenchError(Exception):
    """A failure with a message fit for the report (no traceback needed)."""


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tail(path, lines=15):
    """The last lines of a log file, for error messages; empty if unreadable."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 8192))
            text = handle.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])
    except OSError:
        return ""


class Cleanup:
    """Registry of undo actions; run_all() runs each once, newest first, never raising."""

    _actions = []  # list of (label, callable)
    _children = set()  # Popen objects of short-lived commands still running

    @classmethod
    def add(cls, label, action):
        entry = (label, action)
        cls._actions.append(entry)
        return entry

    @classmethod
    def remove(cls, entry):
        if entry in cls._actions:
            cls._actions.remove(entry)

    @classmethod
    def stop_children(cls):
        """Stops commands still running (fio, mdbench) so that unmounting is not blocked by them."""
        for child in list(cls._children):
            kill_group(child)
        cls._children.clear()

    @classmethod
    def run_all(cls):
        cls.stop_children()
        while cls._actions:
            label, action = cls._actions.pop()
            try:
                action()
            except Exception as error:  # cleanup must go on whatever one step does
                log(f"cleanup: {label}: {error}")


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def kill_group(process, grace_seconds=5.0):
    """Stops a child started with start_new_session=True and every process of its group
    (fio forks one process per job): SIGTERM, then SIGKILL, waiting for all to exit."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None and not _group_alive(process.pid):
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(process.pid):
                return
            time.sleep(0.05)


def run(command, timeout_seconds, check=True, env=None, cwd=None, stdout_path=None, log_path=None):
    """Runs a command to completion within timeout_seconds; returns CompletedProcess.

    Output is captured (or sent to stdout_path). With log_path, stdout and stderr are
    appended to that file instead of pipes: use it for commands that leave a daemon
    behind, which could otherwise hold a pipe open. A timeout kills the command's whole
    process group and raises BenchError, as does a non-zero exit when check is set.
    """
    stderr_handle = subprocess.PIPE
    if log_path:
        stdout_path = None
        stdout_handle = stderr_handle = open(log_path, "ab")
    else:
        stdout_handle = open(stdout_path, "wb") if stdout_path else subprocess.PIPE
    owns_handle = bool(stdout_path or log_path)
    try:
        process = subprocess.Popen(command, stdout=stdout_handle, stderr=stderr_handle,
                                   stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
    except OSError as error:
        if owns_handle:
            stdout_handle.close()
        raise BenchError(f"cannot run {command[0]}: {error}") from error
    Cleanup._children.add(process)
    try:
        out, err = process.communicate(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise BenchError(f"timed out after {timeout_seconds:.0f}s: {' '.join(map(str, command))}")
    finally:
        Cleanup._children.discard(process)
        if owns_handle:
            stdout_handle.close()
    result = subprocess.CompletedProcess(command, process.returncode,
                                         (out or b"").decode("utf-8", "replace"),
                                         (err or b"").decode("utf-8", "replace"))
    if check and result.returncode != 0:
        detail = tail(log_path) if log_path else (result.stderr.strip() or result.stdout.strip())[-1500:]
        raise BenchError(f"exit {result.returncode}: {' '.join(map(str, command))}\n{detail}")
    return result


def start_daemon(command, log_path, env=None):
    """Starts a long-running child in its own session, output to log_path; registers its stop."""
    handle = open(log_path, "ab")
    try:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    except OSError as error:
        raise BenchError(f"cannot start {command[0]}: {error}") from error
    finally:
        handle.close()
    process.cleanup_entry = Cleanup.add(f"stop {os.path.basename(command[0])} pid {process.pid}",
                                        lambda: kill_group(process))
    return process


def stop_daemon(process, grace_seconds=10.0):
    kill_group(process, grace_seconds)
    Cleanup.remove(getattr(process, "cleanup_entry", None))


def free_loopback_port():
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range
    (Deploy/weft_ports.py)."""
    return weft_ports.free_loopback_port()


def wait_for_port(port, timeout_seconds, process=None, log_path=None, what="server"):
    """Waits until 127.0.0.1:port accepts connections; fails early if process exits."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode} before listening\n{tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_seconds}s\n{tail(log_path)}")


def is_mounted(path):
    """True when path is a mountpoint according to /proc/self/mountinfo."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 4 and fields[4].replace("\\040", " ") == real:
                    return True
    except OSError:
        pass
    return False


def mount_fstype(path):
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 4 and fields[4] == real:
                return fields[fields.index("-") + 1]
    return None


def wait_for_mount(path, timeout_seconds, process=None, log_path=None, what="file system"):
    """Waits until path is mounted and answers stat; fails early if process exits."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if is_mounted(path):
            try:
                os.stat(path)
                return
            except OSError:
                pass
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what} exited with {process.returncode} before mounting {path}\n{tail(log_path)}")
        time.sleep(0.1)
    raise BenchError(f"{what} not mounted at {path} within {timeout_seconds}s\n{tail(log_path)}")


def wait_for_unmount(path, timeout_seconds):
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if not is_mounted(path):
            return True
        time.sleep(0.1)
    return False


def unmount_with(command, path, log_path, timeout_seconds=60):
    """Runs a file system's own unmount command until path is unmounted (a busy mount can
    clear within seconds once killed readers exit); falls back to force_unmount."""
    deadline = time.monotonic() + timeout_seconds
    while is_mounted(path) and time.monotonic() < deadline:
        try:
            run(command, max(5, deadline - time.monotonic()), check=False, log_path=log_path)
        except BenchError as error:
            log(f"{' '.join(command[:2])}: {error}")
        if wait_for_unmount(path, 2):
            return
        time.sleep(0.5)
    force_unmount(path)


def force_unmount(path, timeout_seconds=30):
    """Unmounts path by any means: fusermount3 -u, then lazy unmount. Never raises."""
    if not is_mounted(path):
        return
    attempts = (["fusermount3", "-u", path], ["umount", path], ["fusermount3", "-uz", path], ["umount", "-l", path])
    for command in attempts:
        try:
            run(command, timeout_seconds, check=False)
        except BenchError:
            pass
        if wait_for_unmount(path, 5):
            return
    log(f"could not unmount {path}")


def pids_with_argument(argument):
    """Pids of processes whose command line contains argument exactly (our unique paths).

    Some daemons (juicefs) rewrite argv into one space-separated string, so words count too.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                arguments = handle.read().split(b"\0")
        except OSError:
            continue
        wanted = argument.encode()
        if wanted in arguments or any(wanted in word.split(b" ") for word in arguments if b" " in word):
            found.append(int(entry))
    return found


def stop_pids(pids, grace_seconds=10.0):
    """SIGTERM then SIGKILL for pids the benchmark started (found by unique path or pid file)."""
    alive = [pid for pid in pids if pid_alive(pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            alive = [pid for pid in alive if pid_alive(pid)]
            if not alive:
                return
            time.sleep(0.1)


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def wait_pids_exit(pids, timeout_seconds):
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if not any(pid_alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def read_pid_file(path, timeout_seconds=5.0):
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with open(path) as handle:
                text = handle.read().strip()
            if text.isdigit():
                return int(text)
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def drop_caches(timeout_seconds=600):
    """sync, then drop the page cache, dentries and inodes. Raises BenchError if not allowed."""
    run(["sync"], timeout_seconds)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError as error:
        raise BenchError(f"cannot drop the page cache (need root): {error}") from error


def proc_status_kib(pid, field):
    """A field such as VmRSS or VmHWM from /proc/PID/status, in KiB; None if gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def install_signal_handlers():
    """SIGTERM and SIGHUP end the run like Ctrl-C does, so `finally` blocks clean up."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
