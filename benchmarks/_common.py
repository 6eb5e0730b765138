"""Small helpers shared by the benchmark scripts: timing and reporting."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
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
