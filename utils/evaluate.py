"""Accuracy, forgetting, ``results.json``, the report table and ``accuracy.png``.

Forgetting of task k (percentage points) is its test accuracy right after it was trained minus
its accuracy at the end of the sequence, as the original repository reports it (and as
``performance.txt`` records it); the last task has 0 by definition.
"""
from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from utils.scenarios import DESCRIPTIONS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# forgetting bars: accuracy lost (red) or gained (green) on an earlier task
FORGOT = "tab:red"
IMPROVED = "tab:green"


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device,
             reduce: Callable[[int, int], tuple[int, ...]] | None = None) -> float:
    """Top-1 accuracy in percent; the model's train/eval mode is restored afterwards.

    ``reduce`` (under torchrun: a sum over processes, each with its shard of the test set)
    turns this process's (correct, total) counts into those of the whole test set."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(dim=1)
        correct += int((pred.cpu() == y).sum())
        total += len(y)
    model.train(was_training)
    if reduce is not None:
        correct, total = reduce(correct, total)
    return round(100.0 * correct / max(total, 1), 4)


def results(tasks: list[str], acc_matrix: list[list[float]], config: dict[str, Any],
            lambdas: list[float | None] | None = None) -> dict[str, Any]:
    """The ``results.json`` document for the tasks finished so far.

    ``acc_matrix[i][j]`` is the accuracy on task j after training task i (j <= i).
    ``lambdas`` (``--reg_lambda auto``): the λ chosen per task, as ``reg_lambda_per_task``.
    """
    done = len(acc_matrix)
    final = list(acc_matrix[-1]) if acc_matrix else []
    forgetting = [round(acc_matrix[j][j] - final[j], 4) for j in range(done)]
    chosen = {"reg_lambda_per_task": lambdas[:done]} if lambdas else {}
    return {
        "tasks": tasks[:done],
        "acc_matrix": [list(row) for row in acc_matrix],
        "final_acc": final,
        "forgetting": forgetting,
        "avg_acc": round(sum(final) / done, 4) if done else None,
        "avg_forgetting": round(sum(forgetting[:-1]) / (done - 1), 4) if done > 1 else None,
        "config": config,
        **chosen,
    }


def results_json(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def report(doc: dict[str, Any]) -> str:
    """The table printed at the end: per task, accuracy after training, final, forgetting."""
    width = max([len("Task")] + [len(t) for t in doc["tasks"]])
    lines = [f"{'#':>2}  {'Task':<{width}}  {'After training':>14}  {'Final':>7}  "
             f"{'Forgetting':>10}"]
    for j, name in enumerate(doc["tasks"]):
        lines.append(f"{j + 1:>2}  {name:<{width}}  {doc['acc_matrix'][j][j]:>13.2f}%  "
                     f"{doc['final_acc'][j]:>6.2f}%  {doc['forgetting'][j]:>9.2f}pp")
    avg_f = doc["avg_forgetting"]
    scenario = doc["config"].get("scenario", "task")
    lines.append(f"Scenario {scenario}: {DESCRIPTIONS[scenario]}")
    lines.append(f"Average accuracy {doc['avg_acc']:.2f}%, average forgetting "
                 f"{'n/a' if avg_f is None else f'{avg_f:.2f}pp'} (over all but the last task)")
    if "reg_lambda_per_task" in doc:
        lines.append("Lambda chosen per task (--reg_lambda auto): " + ", ".join(
            "-" if v is None else f"{v:g}" for v in doc["reg_lambda_per_task"]))
    return "\n".join(lines)


def plot(doc: dict[str, Any]) -> bytes:
    """``accuracy.png``: the accuracy matrix as a heatmap beside forgetting per task."""
    buf = io.BytesIO()
    figure(doc).savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def figure(doc: dict[str, Any]) -> Figure:
    """The figure of ``accuracy.png``. Forgetting bars are coloured by sign: ``FORGOT`` above
    the zero line (accuracy lost), ``IMPROVED`` below it (accuracy gained on an earlier task
    while learning later ones). A plain ``Figure``, not pyplot's: no backend or global figure
    list is touched."""
    from matplotlib.figure import Figure

    n = len(doc["tasks"])
    grid = [[float("nan")] * n for _ in range(n)]
    for i, row in enumerate(doc["acc_matrix"]):
        grid[i][:len(row)] = row
    fig = Figure(figsize=(10, 4.2))
    left, right = fig.subplots(1, 2)
    image = left.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for i, row in enumerate(doc["acc_matrix"]):
        for j, value in enumerate(row):
            left.text(j, i, f"{value:.1f}", ha="center", va="center",
                      color="white" if value < 60 else "black", fontsize=8)
    ticks = [str(k + 1) for k in range(n)]
    left.set(xticks=range(n), xticklabels=ticks, yticks=range(n), yticklabels=ticks,
             xlabel="evaluated on task", ylabel="after training task", title="Test accuracy (%)")
    fig.colorbar(image, ax=left, fraction=0.046)
    forgetting = doc["forgetting"]
    right.bar(ticks, forgetting, color=[FORGOT if f > 0 else IMPROVED for f in forgetting])
    right.axhline(0, color="black", linewidth=1.0, zorder=3)  # above the bars' edges
    if all(f == 0 for f in forgetting):  # keep the zero line inside the axes
        right.set_ylim(-1, 1)
    right.set(xlabel="task", ylabel="percentage points (< 0: improved)",
              title=f"Forgetting (avg {doc['avg_forgetting'] or 0:.2f}pp)")
    fig.tight_layout()
    return fig
