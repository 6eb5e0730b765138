"""Ports for a local fleet: free ones chosen without collisions, taken ones explained."""

from __future__ import annotations

import random
import socket
from pathlib import Path


class PortInUse(RuntimeError):
    pass


#: Linux's range for ports the kernel hands out itself (port-0 binds, and the source
#: port of every outgoing connection)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000


def ephemeral_range() -> tuple[int, int] | None:
    try:
        low, high = (int(x) for x in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago, below the kernel's ephemeral
    range where it has one: a port planned for a process that starts later must not
    be taken meanwhile by the source port of some outgoing connection (a readiness
    probe, a client), which the kernel picks from that range.

    All sockets stay bound until every port is picked, so no port is handed out
    twice within one call; the candidates are random, so two fleets rarely try the
    same ones.
    """
    socks: list[socket.socket] = []
    try:
        span = ephemeral_range()
        if span is not None and span[0] - LOWEST >= 4 * n:
            for port in random.sample(range(LOWEST, span[0]), min(span[0] - LOWEST, 64 * n)):
                if len(socks) == n:
                    break
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind((host, port))
                except OSError:
                    s.close()
                    continue
                socks.append(s)
        while len(socks) < n:  # no range known (or all taken): let the kernel choose
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def check_free(port: int, what: str, host: str = "127.0.0.1") -> None:
    """``PortInUse`` naming the part that wanted ``port`` when something holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PortInUse(
                f"port {port} for {what} is already in use ({exc.strerror}); "
                "stop what holds it or choose another port"
            ) from None
