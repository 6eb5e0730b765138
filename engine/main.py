"""``kvmarina engine``: the reference engine, or with ``--simulate`` the simulated one
(a timing model with no weights, for router work and capacity planning)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    if "--simulate" in argv:
        from kvmarina.engine.simulate import main as simulate

        return simulate([a for a in argv if a != "--simulate"])
    from kvmarina.engine.serve import main as serve

    return serve(argv)
