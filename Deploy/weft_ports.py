"""Listening ports for the daemons that scripts and tests start on 127.0.0.1.

A port that `bind(("127.0.0.1", 0))` reports free comes from the kernel's ephemeral range,
the same range every outgoing connection takes its local port from: between the pick and
the daemon's own bind, a connection (an agent's, etcd's, another test's) can take it, and the
daemon fails with "Address already in use". So ports are picked at random below that range,
where only explicit binds compete, and each is checked free before it is handed out."""

import random
import socket

LOWEST = 10000


def ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_loopback_port():
    """A TCP port on 127.0.0.1, outside the ephemeral range, that was free a moment ago."""
    low, high = ephemeral_range()
    # The wider of the two stretches outside the ephemeral range.
    below, above = (LOWEST, low - 1), (high + 1, 65535)
    first, last = below if below[1] - below[0] >= above[1] - above[0] else above
    for _ in range(100):
        port = random.randint(first, last)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
