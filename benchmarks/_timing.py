"""Shared timing helper: medians of paired repeats, each fn relative to the first."""
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
