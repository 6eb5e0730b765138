"""Small helpers shared by the benchmark scripts: timing and reporting."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def time_runs(fn: Callable[[], Any], runs: int, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``runs`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def report(rows: list[tuple[str, str, str]], result: dict[str, Any]) -> None:
    """Print a small table (figure, value, baseline) and the JSON result as the last line."""
    width = max(len(r[0]) for r in rows)
    for name, value, base in rows:
        print(f"{name:<{width}}  {value:>14}  {base}")
    print(json.dumps(result, sort_keys=True))


@dataclass(frozen=True)
class Target:
    """One figure a benchmark guards: ``value`` must be at least (or at most) ``limit``.

    ``gate`` False prints the comparison but never fails the run: absolute times on this
    shared machine are too noisy to fail CI on, so quick runs gate on same-run ratios only.
    """

    name: str
    value: float
    limit: float
    higher_is_better: bool = True
    gate: bool = True

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


def enforce(targets: list[Target]) -> int:
    """Print each target as met/MISSED and return the exit status (1 when a gated one missed)."""
    failed = False
    for t in targets:
        sign = ">=" if t.higher_is_better else "<="
        state = "met" if t.met else ("MISSED" if t.gate else "missed (not gated)")
        print(f"target {t.name}: {t.value:.4g} {sign} {t.limit:.4g}: {state}")
        failed = failed or (t.gate and not t.met)
    return 1 if failed else 0
