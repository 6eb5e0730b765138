"""``kvmarina engine``: ``--simulate`` runs the simulated engine (timing model, no model);
the real engine's entry point arrives with issue 6 and extends this file."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if "--simulate" in argv:
        from kvmarina.engine.simulate import main as simulate

        return simulate([a for a in argv if a != "--simulate"])
    print(
        "kvmarina engine: the real engine arrives with issue 6; use --simulate for now",
        file=sys.stderr,
    )
    return 2
