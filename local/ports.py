"""Ports for a local fleet: free ones chosen without collisions, taken ones explained."""

from __future__ import annotations

import socket


class PortInUse(RuntimeError):
    pass


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago.

    All sockets stay bound until every port is picked, so the kernel cannot hand
    the same port out twice within one call.
    """
    socks = []
    try:
        for _ in range(n):
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
