#!/usr/bin/env python3
"""Write workload for test_crash.py; runs until a system call fails or it is killed.

Journal lines (each one write(2) on a local file, written only after the durability point):
  final NAME SHA256      NAME is durable with exactly this content (fsync of the file and
                         of its directory returned)
  pending NAME SHA256    an atomic replace of NAME by this content is under way: after a
                         crash NAME holds either the previous final content or this one
Files written without fsync are not journaled: a crash may lose them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys

MiB = 1024 * 1024


def write_pieces(fd: int, data: bytes, rng: random.Random) -> None:
    view = memoryview(data)
    while view:
        piece = view[:rng.choice((4096, 65536 + 17, 1 * MiB, 3 * MiB))]
        n = os.write(fd, piece)
        view = view[n:]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--journal", required=True)
    ap.add_argument("--seed", type=int, required=True)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.root, exist_ok=True)
    journal = os.open(args.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(kind: str, name: str, digest: str) -> None:
        os.write(journal, f"{kind} {name} {digest}\n".encode())

    i = 0
    try:
        while True:
            size = rng.choice((0, 1, rng.randint(2, 100_000), rng.randint(100_000, 3 * MiB),
                               rng.randint(4 * MiB, 9 * MiB)))
            if rng.random() < 0.3:                           # bytes that compress (zstd volumes)
                pattern = rng.randbytes(rng.randint(1, 300))
                data = (pattern * (size // len(pattern) + 1))[:size]
            else:
                data = rng.randbytes(size)
            digest = hashlib.sha256(data).hexdigest()
            kind = rng.random()
            if kind < 0.5:                                   # new file, fsynced
                name = f"f{i:05d}"
                fd = os.open(os.path.join(args.root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    write_pieces(fd, data, rng)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                fsync_dir(args.root)
                note("final", name, digest)
            elif kind < 0.75:                                # atomic replace via rename
                name = f"target{rng.randrange(4)}"
                tmp = os.path.join(args.root, f".tmp{i:05d}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    write_pieces(fd, data, rng)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                note("pending", name, digest)
                os.rename(tmp, os.path.join(args.root, name))
                fsync_dir(args.root)
                note("final", name, digest)
            else:                                            # not fsynced: may be lost
                fd = os.open(os.path.join(args.root, f"u{i:05d}"), os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    write_pieces(fd, data, rng)
                finally:
                    os.close(fd)
            i += 1
    except OSError as e:
        print(f"crash_writer: stopped after {i} files: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
