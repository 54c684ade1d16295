"""Randomized model test: one random sequence of file-system operations runs on Weft and on
a local directory side by side; results, errnos, sizes, link counts and contents must agree
after every step.

Volumes use --chunk-size 65536 so that small random writes cross chunk boundaries.
Environment:
  WEFT_MODEL_SEEDS   number of seeds (default 20)
  WEFT_MODEL_OPS     operations per seed (default 300)
  WEFT_MODEL_SEED    run only this seed (replay)
  WEFT_MODEL_BASE_SEED first seed (default 1000)
  WEFT_MODEL_ZSTD_SEEDS number of seeds on a zstd volume (default 6; their own seeds, from
                       the base seed + 500)
A failure prints the seed, the step and the trace of operations up to it.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path
from typing import Optional

import pytest

from posix_helpers import RENAME_EXCHANGE, RENAME_NOREPLACE, ename, renameat2

CHUNK_BYTES = 65536
NAMES = ("a", "b", "c", "d", "e")
MAX_DEPTH = 3
FD_SLOTS = 6
SEEDS = int(os.environ.get("WEFT_MODEL_SEEDS", "20"))
ZSTD_SEEDS = int(os.environ.get("WEFT_MODEL_ZSTD_SEEDS", "6"))
OPS = int(os.environ.get("WEFT_MODEL_OPS", "300"))
BASE_SEED = int(os.environ.get("WEFT_MODEL_BASE_SEED", "1000"))
FULL_COMPARE_EVERY = 25
REMOUNT_PROBABILITY = 0.003

OPEN_ACCESS = (os.O_RDONLY, os.O_WRONLY, os.O_RDWR)
OPEN_EXTRA = (os.O_CREAT, os.O_EXCL, os.O_TRUNC, os.O_APPEND)
FLAG_NAMES = {os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR", os.O_CREAT: "O_CREAT",
              os.O_EXCL: "O_EXCL", os.O_TRUNC: "O_TRUNC", os.O_APPEND: "O_APPEND"}
RENAME_FLAG_NAMES = {0: "0", RENAME_NOREPLACE: "NOREPLACE", RENAME_EXCHANGE: "EXCHANGE"}


class Mismatch(AssertionError):
    pass


def flags_text(flags: int) -> str:
    names = [n for f, n in FLAG_NAMES.items() if flags & f]
    return "|".join(names or ["O_RDONLY"]) if flags & 3 else "|".join(["O_RDONLY", *names])


def data_for(seed: int, size: int) -> bytes:
    """Random bytes, or for a third of the writes (their data seed) bytes that compress (a short
    random pattern repeated), so that zstd volumes store compressed and raw blocks side by side.
    The random two thirds still catch bytes read from the wrong place within one write."""
    rng = random.Random(seed)
    if seed % 3 == 0:
        pattern = rng.randbytes(rng.randrange(1, 200))
        return (pattern * (size // len(pattern) + 1))[:size]
    return rng.randbytes(size)


# --------------------------------------------------------------------------- one side

class Side:
    """One tree (Weft or the reference) and its table of open fds."""

    def __init__(self, root: Path):
        self.root = str(root)
        self.fds: list[Optional[int]] = [None] * FD_SLOTS
        self.fd_paths: list[Optional[str]] = [None] * FD_SLOTS

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def close_all(self) -> None:
        for i, fd in enumerate(self.fds):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.fds[i] = None
            self.fd_paths[i] = None

    def apply(self, op: tuple):
        """Runs one operation; returns a comparable result (value or errno name)."""
        kind = op[0]
        try:
            return self._apply(kind, op)
        except OSError as e:
            return ("ERR", ename(e.errno))

    def _fd(self, slot: int) -> Optional[int]:
        return self.fds[slot]

    def _apply(self, kind: str, op: tuple):
        if kind == "open":
            _, rel, flags, slot = op
            if self.fds[slot] is not None:
                os.close(self.fds[slot])
                self.fds[slot] = None
            self.fds[slot] = os.open(self.p(rel), flags, 0o644)
            self.fd_paths[slot] = rel
            return "OK"
        if kind in ("close", "pwrite", "write", "lseek", "pread", "read", "ftruncate", "fstat",
                    "fsync"):
            slot = op[1]
            fd = self._fd(slot)
            if fd is None:
                return "NOFD"
            if kind == "close":
                self.fds[slot] = None
                self.fd_paths[slot] = None
                os.close(fd)
                return "OK"
            if kind == "pwrite":
                _, _, offset, size, dseed = op
                return os.pwrite(fd, data_for(dseed, size), offset)
            if kind == "write":
                _, _, size, dseed = op
                return os.write(fd, data_for(dseed, size))
            if kind == "lseek":
                return os.lseek(fd, op[2], os.SEEK_SET)
            if kind == "pread":
                data = os.pread(fd, op[3], op[2])
                return (len(data), hashlib.sha256(data).hexdigest()[:16])
            if kind == "read":
                data = os.read(fd, op[2])
                return (len(data), hashlib.sha256(data).hexdigest()[:16])
            if kind == "ftruncate":
                os.ftruncate(fd, op[2])
                return "OK"
            if kind == "fstat":
                return stat_summary(os.fstat(fd))
            if kind == "fsync":
                os.fsync(fd)
                return "OK"
        if kind == "truncate":
            os.truncate(self.p(op[1]), op[2])
            return "OK"
        if kind == "rename":
            _, src, dst, flags = op
            renameat2(self.p(src), self.p(dst), flags)
            return "OK"
        if kind == "unlink":
            os.unlink(self.p(op[1]))
            return "OK"
        if kind == "mkdir":
            os.mkdir(self.p(op[1]), 0o755)
            return "OK"
        if kind == "rmdir":
            os.rmdir(self.p(op[1]))
            return "OK"
        if kind == "link":
            os.link(self.p(op[1]), self.p(op[2]), follow_symlinks=False)
            return "OK"
        if kind == "symlink":
            os.symlink(op[1], self.p(op[2]))
            return "OK"
        if kind == "stat":
            return stat_summary(os.stat(self.p(op[1])))
        if kind == "lstat":
            return stat_summary(os.lstat(self.p(op[1])))
        if kind == "readlink":
            return os.readlink(self.p(op[1]))
        if kind == "listdir":
            return sorted(os.listdir(self.p(op[1])))
        if kind == "readfile":
            with open(self.p(op[1]), "rb") as f:
                data = f.read()
            return (len(data), hashlib.sha256(data).hexdigest()[:16])
        raise ValueError(f"unknown op {op!r}")

    # -- observing state --------------------------------------------------------------

    def describe(self, rel: str):
        """Everything comparable about one path (not following a final symlink)."""
        try:
            st = os.lstat(self.p(rel))
        except OSError as e:
            return ("ERR", ename(e.errno))
        summary = stat_summary(st)
        if stat.S_ISREG(st.st_mode):
            try:
                with open(self.p(rel), "rb") as f:
                    data = f.read()
                content = (len(data), hashlib.sha256(data).hexdigest()[:16])
            except OSError as e:
                content = ("ERR", ename(e.errno))
            return (summary, content)
        if stat.S_ISLNK(st.st_mode):
            return (summary, os.readlink(self.p(rel)))
        if stat.S_ISDIR(st.st_mode):
            try:
                return (summary, sorted(os.listdir(self.p(rel))))
            except OSError as e:
                return (summary, ("ERR", ename(e.errno)))
        return (summary,)

    def tree(self) -> list[str]:
        """All relative paths below the root, sorted (symlinks are not followed)."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in dirnames + filenames:
                out.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(out)


def stat_summary(st: os.stat_result) -> tuple:
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    return (stat.filemode(st.st_mode), size, st.st_nlink)


# --------------------------------------------------------------------------- generator

class Generator:
    """Random operations; choices depend only on the seed and the reference side's state
    (its tree and its open fds), so a seed replays exactly."""

    FD_OPS = ("close", "pwrite", "write", "lseek", "pread", "read", "ftruncate", "fstat", "fsync")

    def __init__(self, seed: int, reference: Side):
        self.rng = random.Random(seed)
        self.ref = reference
        self.data_seed = seed * 1_000_000

    # -- paths ---------------------------------------------------------------------

    def entries(self) -> list[tuple[str, str]]:
        out = []
        for rel in self.ref.tree():
            mode = os.lstat(self.ref.p(rel)).st_mode
            out.append((rel, "dir" if stat.S_ISDIR(mode) else
                        "symlink" if stat.S_ISLNK(mode) else "file"))
        return out

    def random_path(self) -> str:
        depth = self.rng.choice((1, 1, 2, 2, 3))
        return "/".join(self.rng.choice(NAMES) for _ in range(depth))

    def existing(self, kinds=("file", "dir", "symlink")) -> Optional[str]:
        candidates = [rel for rel, kind in self.entries() if kind in kinds]
        return self.rng.choice(candidates) if candidates else None

    def new_path(self) -> str:
        """A name in an existing directory (usually free, sometimes taken)."""
        dirs = [""] + [rel for rel, kind in self.entries()
                       if kind == "dir" and rel.count("/") < MAX_DEPTH - 1]
        parent = self.rng.choice(dirs)
        name = self.rng.choice(NAMES)
        return f"{parent}/{name}" if parent else name

    def path(self, kinds=("file", "dir", "symlink")) -> str:
        r = self.rng.random()
        if r < 0.6:
            found = self.existing(kinds)
            if found is not None:
                return found
        if r < 0.9:
            return self.new_path()
        return self.random_path()

    # -- values ----------------------------------------------------------------------

    def offset(self) -> int:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.randrange(1, 4) * CHUNK_BYTES - self.rng.randint(1, 600)   # near a boundary
        if r < 0.5:
            return self.rng.randint(0, 300)
        return self.rng.randint(0, 4 * CHUNK_BYTES)

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.4:
            return self.rng.randint(1, 300)
        if r < 0.8:
            return self.rng.randint(1, 20_000)
        return self.rng.randint(CHUNK_BYTES // 2, 2 * CHUNK_BYTES + 100)

    def symlink_target(self) -> str:
        # Relative and inside the tree, so both sides resolve it the same way.
        return "/".join(self.rng.choice(NAMES) for _ in range(self.rng.choice((1, 1, 2))))

    # -- operations ------------------------------------------------------------------

    def open_op(self) -> tuple:
        rng = self.rng
        free = [i for i, fd in enumerate(self.ref.fds) if fd is None]
        slot = rng.choice(free) if free else rng.randrange(FD_SLOTS)
        flags = rng.choices(OPEN_ACCESS, weights=[1, 1, 2])[0]
        for extra in OPEN_EXTRA:
            if rng.random() < (0.7 if extra == os.O_CREAT else 0.15):
                flags |= extra
        return ("open", self.path(("file", "file", "symlink")), flags, slot)

    def next_op(self) -> tuple:
        rng = self.rng
        choice = rng.choices(
            ["open", "close", "pwrite", "write", "lseek", "pread", "read", "ftruncate", "fstat",
             "fsync", "truncate", "rename", "unlink", "mkdir", "rmdir", "link", "symlink", "stat",
             "lstat", "readlink", "listdir", "readfile", "remount"],
            weights=[10, 4, 16, 8, 2, 6, 3, 3, 2, 1, 3, 8, 5, 4, 3, 3, 3, 2, 2, 1, 2, 2,
                     REMOUNT_PROBABILITY * 100])[0]
        if choice in self.FD_OPS:
            occupied = [i for i, fd in enumerate(self.ref.fds) if fd is not None]
            if not occupied:
                return self.open_op()
            slot = rng.choice(occupied)
        if choice == "open":
            return self.open_op()
        if choice == "close":
            return ("close", slot)
        if choice == "pwrite":
            self.data_seed += 1
            return ("pwrite", slot, self.offset(), self.size(), self.data_seed)
        if choice == "write":
            self.data_seed += 1
            return ("write", slot, self.size(), self.data_seed)
        if choice == "lseek":
            return ("lseek", slot, self.offset())
        if choice == "pread":
            return ("pread", slot, self.offset(), self.size())
        if choice == "read":
            return ("read", slot, self.size())
        if choice == "ftruncate":
            return ("ftruncate", slot, self.offset())
        if choice in ("fstat", "fsync"):
            return (choice, slot)
        if choice == "truncate":
            return ("truncate", self.path(("file", "file", "symlink", "dir")), self.offset())
        if choice == "rename":
            flags = rng.choices([0, RENAME_NOREPLACE, RENAME_EXCHANGE], weights=[6, 2, 2])[0]
            src = self.existing() if rng.random() < 0.9 else None
            dst = self.existing() if rng.random() < 0.4 else None
            return ("rename", src or self.random_path(), dst or self.new_path(), flags)
        if choice == "link":
            src = self.existing(("file", "symlink")) if rng.random() < 0.9 else None
            return ("link", src or self.path(), self.new_path())
        if choice == "symlink":
            return ("symlink", self.symlink_target(), self.new_path())
        if choice == "mkdir":
            return ("mkdir", self.new_path())
        if choice == "rmdir":
            return ("rmdir", self.path(("dir", "dir", "dir", "file", "symlink")))
        if choice == "unlink":
            return ("unlink", self.path(("file", "file", "symlink", "dir")))
        if choice == "readlink":
            return ("readlink", self.path(("symlink", "symlink", "file")))
        if choice == "listdir":
            return ("listdir", self.path(("dir",)))
        if choice == "remount":
            return ("remount",)
        return (choice, self.path())


def op_text(op: tuple) -> str:
    kind = op[0]
    if kind == "open":
        return f"open({op[1]!r}, {flags_text(op[2])}) -> slot {op[3]}"
    if kind == "rename":
        return f"renameat2({op[1]!r}, {op[2]!r}, {RENAME_FLAG_NAMES[op[3]]})"
    if kind == "pwrite":
        return f"pwrite(slot {op[1]}, offset={op[2]}, size={op[3]}, data_seed={op[4]})"
    if kind == "write":
        return f"write(slot {op[1]}, size={op[2]}, data_seed={op[3]})"
    return f"{kind}({', '.join(repr(a) for a in op[1:])})"


def touched_paths(op: tuple, side: Side) -> list[str]:
    """Paths whose state the operation may have changed (and their parents)."""
    kind = op[0]
    paths: list[str] = []
    if kind in ("open", "truncate", "unlink", "mkdir", "rmdir"):
        paths = [op[1]]
    elif kind in ("rename", "link"):
        paths = [op[1], op[2]]
    elif kind == "symlink":
        paths = [op[2]]
    elif kind in ("pwrite", "write", "ftruncate", "close") and side.fd_paths[op[1]]:
        paths = [side.fd_paths[op[1]]]
    with_parents = []
    for p in paths:
        with_parents.append(p)
        parent = os.path.dirname(p)
        with_parents.append(parent)
    return sorted(set(with_parents))


# --------------------------------------------------------------------------- the test

def run_seed(seed: int, weft_side: Side, ref_side: Side, fs, trace: list[str]) -> None:
    gen = Generator(seed, ref_side)
    for step in range(OPS):
        op = gen.next_op()
        if op[0] == "remount":
            weft_side.close_all()
            ref_side.close_all()
            fs.remount()
            trace.append(f"{step:4d} remount (all fds closed)")
            compare_trees(weft_side, ref_side, step)
            continue
        fd_path_before = weft_side.fd_paths[op[1]] if op[0] in ("close", "ftruncate") else None
        got = weft_side.apply(op)
        want = ref_side.apply(op)
        trace.append(f"{step:4d} {op_text(op)} = {want!r}")
        if got != want:
            raise Mismatch(f"step {step}: {op_text(op)}: Weft gave {got!r}, local gave {want!r}")
        paths = touched_paths(op, ref_side)
        if fd_path_before:
            paths.append(fd_path_before)
        for rel in paths:
            w, r = weft_side.describe(rel), ref_side.describe(rel)
            if w != r:
                raise Mismatch(f"step {step}: after {op_text(op)}: state of {rel or '/'!r} differs:"
                               f"\n  Weft:  {w!r}\n  local: {r!r}")
        if op[0] in ("pwrite", "write", "ftruncate"):
            w = weft_side.apply(("fstat", op[1]))
            r = ref_side.apply(("fstat", op[1]))
            if w != r:
                raise Mismatch(f"step {step}: fstat after {op_text(op)}: Weft {w!r}, local {r!r}")
        if step % FULL_COMPARE_EVERY == FULL_COMPARE_EVERY - 1:
            compare_trees(weft_side, ref_side, step)
    compare_trees(weft_side, ref_side, OPS)


def compare_trees(weft_side: Side, ref_side: Side, step: int) -> None:
    wt, rt = weft_side.tree(), ref_side.tree()
    if wt != rt:
        raise Mismatch(f"step {step}: trees differ:\n  only on Weft:  {sorted(set(wt) - set(rt))}"
                       f"\n  only locally:  {sorted(set(rt) - set(wt))}")
    for rel in [""] + rt:
        w, r = weft_side.describe(rel), ref_side.describe(rel)
        if w != r:
            raise Mismatch(f"step {step}: state of {rel or '/'!r} differs:\n  Weft:  {w!r}\n"
                           f"  local: {r!r}")


def seeds(compression: str) -> list[int]:
    if os.environ.get("WEFT_MODEL_SEED"):
        return [int(os.environ["WEFT_MODEL_SEED"])]
    if compression == "zstd":
        return list(range(BASE_SEED + 500, BASE_SEED + 500 + ZSTD_SEEDS))
    return list(range(BASE_SEED, BASE_SEED + SEEDS))


@pytest.mark.weft_timeout(1800)
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_random_operations_match_local_fs(weft_factory, resources, mode, compression):
    fs = weft_factory(format_args=["--chunk-size", CHUNK_BYTES, "--compression", compression])
    ref_root = resources.new_dir("model-reference")
    failures = []
    passed = []
    for seed in seeds(compression):
        weft_dir = fs.path / f"seed-{seed}"
        ref_dir = ref_root / f"seed-{seed}"
        os.mkdir(weft_dir)
        os.mkdir(ref_dir)
        weft_side, ref_side = Side(weft_dir), Side(ref_dir)
        trace: list[str] = []
        try:
            run_seed(seed, weft_side, ref_side, fs, trace)
            passed.append((seed, weft_side, ref_side))
        except Mismatch as e:
            failures.append((seed, str(e), trace))
        finally:
            weft_side.close_all()
            ref_side.close_all()
    # Everything the passing seeds built must survive a remount.
    fs.remount()
    for seed, weft_side, ref_side in passed:
        try:
            compare_trees(weft_side, ref_side, OPS)
        except Mismatch as e:
            failures.append((seed, f"after the final remount: {e}", []))
    if failures:
        seed, message, trace = failures[0]
        lines = [f"{len(failures)} of {len(seeds(compression))} seeds disagree with the local file system "
                 f"(mode {mode}, compression {compression}, {OPS} ops each):"]
        lines += [f"  seed {s}: {m.splitlines()[0]}" for s, m, _ in failures]
        lines.append(f"\nfirst failure, seed {seed}:\n{message}")
        lines.append(f"replay: WEFT_MODEL_SEED={seed} WEFT_MODEL_OPS={OPS} "
                     f"WEFT_TEST_MODES={mode} python3 -m pytest -q Tests/integration/test_model.py -k {compression}")
        lines.append("trace (step, operation = local result):")
        lines += trace[-400:]
        pytest.fail("\n".join(lines), pytrace=False)
