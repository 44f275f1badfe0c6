"""Shared timing helpers: medians of paired repeats, each fn relative to the first."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict


def paired(fns: Dict[str, Callable[[], None]], repeats: int, inner: int,
           clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Median over repeats of each fn's time relative to the first one ('baseline'), the order
    alternating between repeats. ``clock``: wall time by default; ``time.process_time`` counts
    this process's CPU time only, which other work on the machine inflates less."""
    names = list(fns)
    ratios = {n: [] for n in names[1:]}
    base_times = []
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        t = {}
        for n in order:
            start = clock()
            for _ in range(inner):
                fns[n]()
            t[n] = (clock() - start) / inner
        base_times.append(t[names[0]])
        for n in names[1:]:
            ratios[n].append(t[n] / t[names[0]])
    out = {n: statistics.median(v) for n, v in ratios.items()}
    out["baseline_ms"] = statistics.median(base_times) * 1e3
    return out


def each_against_baseline(fns: Dict[str, Callable[[], None]], repeats: int, inner: int,
                          clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Each candidate paired with the first fn (the baseline) alone, the two alternating, so
    that no third model's memory sits between them: each ratio is one A/B comparison."""
    names = list(fns)
    out: Dict[str, float] = {}
    for name in names[1:]:
        r = paired({"baseline": fns[names[0]], name: fns[name]}, repeats, inner, clock)
        out[name] = r[name]
        out.setdefault("baseline_ms", r["baseline_ms"])
    return out
