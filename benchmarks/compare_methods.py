"""Fine-tuning, MAS (proximal and gradient penalty step), l-MAS and SI on Split and Permuted
Digits.

Every (benchmark, method, reg_lambda, seed) is one ``train.py`` run in its own folder under
``--out_dir`` (a finished run is reused, so the comparison can be stopped and restarted). For
each method the table shows the reg_lambda with the best mean average accuracy over the seeds
and, below, the whole grid; mean ± std over seeds. A plot of average forgetting against average
accuracy is written next to the runs.

    python benchmarks/compare_methods.py            # 3 seeds, the whole grid
    python benchmarks/compare_methods.py --quick    # 1 seed, 1 epoch: a smoke run
    python benchmarks/compare_methods.py --benchmarks split-digits --methods MAS \
        --lambdas 1 3 10 --seeds 5 --train_flags="--init_lr 0.02"   # one targeted sweep
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, train.py flags, reg_lambda grid). Fine-tuning is reg_lambda 0 by definition. "MAS"
# is train.py's default (the proximal penalty step); the others keep the explicit gradient step
# they were measured with.
METHODS = [
    ("finetune", ("--method", "finetune"), [0.0]),
    ("MAS", ("--method", "mas", "--penalty_step", "proximal"), [0.3, 1.0, 3.0, 10.0]),
    ("MAS gradient", ("--method", "mas", "--penalty_step", "gradient"), [0.1, 0.3, 1.0]),
    ("l-MAS", ("--method", "lmas", "--penalty_step", "gradient"), [0.001, 0.01, 0.1]),
    ("SI", ("--method", "si", "--penalty_step", "gradient"), [0.1, 1.0, 10.0]),
]
BENCHMARKS = ["split-digits", "permuted-digits"]


def run_one(out: Path, benchmark: str, flags: tuple, lam: float, seed: int,
            extra: list[str]) -> dict | None:
    """The run's results.json, or None when training diverged (train.py's exit 2). A run that
    finished before is reused; one that was interrupted is started again."""
    results, done, diverged = out / "results.json", out / "FINISHED", out / "DIVERGED"
    if diverged.exists():
        return None
    if not done.exists():
        cmd = [sys.executable, str(ROOT / "train.py"), "--benchmark", benchmark, *flags,
               "--reg_lambda", str(lam), "--seed", str(seed), "--output_dir", str(out),
               "--overwrite", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode == 2 and "diverged" in proc.stderr:
            diverged.write_text(proc.stderr)
            return None
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        done.touch()
    return json.loads(results.read_text())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:6.1f}"
    return f"{statistics.mean(values):6.1f} ± {statistics.stdev(values):4.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    parser.add_argument("--out_dir", type=Path, default=ROOT / "benchmarks" / "results" / "compare",
                        help="where the runs, the table and the plot go")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch per task")
    parser.add_argument("--benchmarks", nargs="+", choices=BENCHMARKS, default=BENCHMARKS,
                        help="only these benchmarks")
    parser.add_argument("--methods", nargs="+", choices=[m[0] for m in METHODS],
                        help="only these methods (labels as in the table)")
    parser.add_argument("--lambdas", nargs="+", type=float,
                        help="this reg_lambda grid instead of each method's own")
    parser.add_argument("--train_flags", default="",
                        help='more train.py flags for every run, e.g. "--init_lr 0.02"')
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    extra = (["--num_epochs", "1"] if args.quick else []) + args.train_flags.split()
    tag = "_".join(f.lstrip("-") for f in args.train_flags.split())
    out_dir = args.out_dir / ("quick" if args.quick else "full") / tag
    methods = [(label, flags, args.lambdas if args.lambdas and label != "finetune" else grid)
               for label, flags, grid in METHODS if not args.methods or label in args.methods]

    jobs = [(b, label, flags, lam, seed) for b in args.benchmarks for label, flags, grid in methods
            for lam in grid for seed in range(seeds)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {job: pool.submit(run_one, out_dir / "runs" / f"{job[0]}_{job[1].replace(' ', '-')}_"
                                    f"{job[3]}_{job[4]}", job[0], job[2], job[3], job[4], extra)
                   for job in jobs}
        res = {job: f.result() for job, f in futures.items()}

    lines, best = [], {}
    for b in args.benchmarks:
        lines += [f"\n{b} ({seeds} seed{'s' * (seeds > 1)}): mean ± std over seeds",
                  f"{'method':14s} {'reg_lambda':>10s} {'avg acc %':>14s} {'avg forgetting':>16s}"]
        grid_lines = ["  whole grid:"]
        for label, _, grid in methods:
            rows = []
            for lam in grid:
                runs = [res[job] for job in jobs if job[:2] == (b, label) and job[3] == lam]
                if any(r is None for r in runs):  # a diverged seed disqualifies the setting
                    n = sum(r is None for r in runs)
                    grid_lines.append(f"  {label:12s} {lam:>10g}   diverged ({n} of {len(runs)} "
                                      "seeds)")
                    continue
                acc = [r["avg_acc"] for r in runs]
                fgt = [r["avg_forgetting"] for r in runs]
                rows.append((statistics.mean(acc), lam, acc, fgt))
                grid_lines.append(f"  {label:12s} {lam:>10g} {mean_std(acc):>14s} "
                                  f"{mean_std(fgt):>16s}")
            if not rows:
                lines.append(f"{label:14s} {'-':>10s} {'diverged':>14s}")
                continue
            _, lam, acc, fgt = max(rows)
            best[(b, label)] = (acc, fgt)
            lines.append(f"{label:14s} {lam:>10g} {mean_std(acc):>14s} {mean_std(fgt):>16s}")
        lines += grid_lines
    text = "\n".join(lines)
    print(text)
    (out_dir / "table.txt").write_text(text + "\n")
    plot(best, seeds, args.benchmarks, out_dir / "compare_methods.png")
    print(f"\nplot: {out_dir / 'compare_methods.png'}")


def plot(best: dict, seeds: int, benchmarks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(benchmarks), figsize=(5.5 * len(benchmarks), 4.2),
                             squeeze=False)
    axes = axes[0]
    for ax, b in zip(axes, benchmarks):
        for label, _, _ in METHODS:
            if (b, label) not in best:
                continue
            acc, fgt = best[(b, label)]
            ax.errorbar(statistics.mean(fgt), statistics.mean(acc),
                        xerr=statistics.stdev(fgt) if seeds > 1 else None,
                        yerr=statistics.stdev(acc) if seeds > 1 else None,
                        fmt="o", capsize=3, label=label)
        ax.set_title(b)
        ax.set_xlabel("average forgetting (points)")
        ax.set_ylabel("average accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"best reg_lambda per method, mean ± std over {seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
