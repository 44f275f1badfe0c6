"""Speed of the two hot paths: the optimizer step (bench_step.py) and the importance pass
(bench_importance.py), as ratios against baselines measured in the same run.

CPU, one thread, medians of paired repeats. Run:  python benchmarks/bench_mas.py  [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_importance  # noqa: E402
import bench_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats (default 15)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, medians of {repeats} paired repeats\n")
    bench_step.main(repeats, time.process_time)
    print()
    bench_importance.main(repeats)


if __name__ == "__main__":
    main()
