"""``kvmarina down``: stop the local fleet of this run directory."""

from __future__ import annotations

from kvmarina.local.up import down


def main(argv: list[str]) -> int:
    return down(argv)
