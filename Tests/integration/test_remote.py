"""Two agents on one weftd: what one writes and closes, the other sees when it opens."""

from __future__ import annotations

import os

from posix_helpers import read_file, write_file
from weft_harness import find_key


def test_two_agents_share_one_volume(weft):
    weft.require_weft("mounts a second agent")
    weft.require_mode("remote")
    other = weft.add_agent("mnt-b")
    data = os.urandom(3 * 1024 * 1024 + 5)
    write_file(weft.path / "from-a", data)                  # close() publishes it
    assert read_file(other / "from-a") == data
    os.mkdir(other / "dir-from-b")
    write_file(other / "dir-from-b" / "f", b"from b")
    assert read_file(weft.path / "dir-from-b" / "f") == b"from b"
    os.rename(weft.path / "from-a", weft.path / "renamed-by-a")
    assert sorted(os.listdir(other)) == ["dir-from-b", "renamed-by-a"]
    agents = find_key(weft.status(), "connectedAgents")
    count = len(agents) if isinstance(agents, list) else agents
    assert count >= 2, f"connectedAgents is {agents!r} with two agents mounted"
