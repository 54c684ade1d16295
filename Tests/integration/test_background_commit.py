"""Buffered writes of a file its writer keeps open reach the hub within the commit interval.

The writer is a separate process that never forks: any fork+exec in the writing process would
close an inherited descriptor and so flush the file, which is exactly what this test must avoid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from posix_helpers import read_file
from weft_harness import find_key

WRITER = r"""
import os, sys, time
path, size = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, bytes((i * 7) % 251 for i in range(size)))
print("written", flush=True)
time.sleep(60)
"""


def test_open_writer_data_reaches_the_hub_without_close(weft):
    weft.require_weft("reads the hub's own counters")
    size = 256 * 1024 + 3
    expected = bytes((i * 7) % 251 for i in range(size))
    path = weft.path / "kept-open"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(size)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "written"
        started = time.monotonic()
        seen = find_key(weft.status(), "volumeSizeBytes")
        while seen < size and time.monotonic() - started < 30:
            time.sleep(0.5)
            seen = find_key(weft.status(), "volumeSizeBytes")
        assert seen >= size, "buffered data of an open file was not committed within 30 s"
        if weft.mode == "remote":
            other = weft.add_agent("mnt-b")
            assert read_file(other / "kept-open") == expected
        assert writer.poll() is None, "the writer exited (and so closed the file) before the check"
    finally:
        writer.kill()
        writer.wait()
    assert read_file(path) == expected
