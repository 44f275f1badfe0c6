"""``--reg_lambda 0 0.1 1 10``: a λ sweep in one process, the task data loaded once.

Each value is an ordinary run in ``<output_dir>/lambda_<value>/`` (its usual files, its own
checkpoint). The sweep's own files in ``<output_dir>``:

* ``sweep_plan.json``: the values and the settings of the sweep, written before the first run,
  so that ``--resume`` continues it (finished runs are not redone, the interrupted one resumes
  from its checkpoint, the rest start) with the same settings;
* ``sweep.json``: ``[{"reg_lambda", "avg_acc", "avg_forgetting"}, ...]`` of the runs finished,
  in the order given, rewritten after each run;
* ``sweep.png``: final average accuracy against average forgetting, one point per λ.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

from utils import AppError, first_line
from utils.checkpoint import CHECKPOINT, CrashTest, RunDir
from utils.config import FOLDERS, Config
from utils.data import Task
from utils.distributed import Dist
from utils.lambda_search import AUTO

PLAN = "sweep_plan.json"
SWEEP = "sweep.json"
SWEEP_PLOT = "sweep.png"
RunOne = Callable[[dict[str, Any], Dist, Callable[[Config], list[Task]], RunDir],
                  dict[str, Any]]


def split_flags(given: dict[str, Any]) -> tuple[dict[str, Any], list[float] | None]:
    """The parsed flags as a single run's (``reg_lambda`` one value) and no sweep, or as a
    sweep's: its values (from the flags, or on ``--resume`` from the sweep in --output_dir)."""
    given = dict(given)
    values = given.pop("reg_lambda", None)
    root = Path(given.get("output_dir", Config().output_dir))
    sweep_resumed = bool(given.get("resume")) and (root / PLAN).exists()
    if values is not None and AUTO in values and len(values) > 1:
        raise AppError("--reg_lambda auto chooses lambda itself: give it alone, not with "
                       "other values")
    if values is not None and len(set(map(name, values))) < len(values):
        raise AppError(f"--reg_lambda {_show(values)}: a value is given twice")
    if (values is None or len(values) == 1) and not sweep_resumed:
        if (root / PLAN).exists() and not given.get("resume"):
            raise AppError(f"{root} holds a sweep ({PLAN}): a single run needs another "
                           "--output_dir")
        return given if values is None else {**given, "reg_lambda": values[0]}, None
    if given.get("resume") and not sweep_resumed:
        raise AppError(f"--resume: {root} holds no sweep ({PLAN}); "
                       + ("to resume its single run drop the --reg_lambda values"
                          if (root / CHECKPOINT).exists() else "nothing to resume"))
    return given, values or []


def name(value: float | str) -> str:
    """The folder of a λ value's run: ``lambda_0.1``, ``lambda_10``, ``lambda_1e-05``."""
    return f"lambda_{_show([value])}"


def _show(values: list[float | str]) -> str:
    return " ".join(v if isinstance(v, str) else f"{v:g}" for v in values)


def load_once(load: Callable[[Config], list[Task]]) -> Callable[[Config], list[Task]]:
    """``load`` that reads and decodes the tasks on the first call only: every run of a sweep
    has the same data settings (the plan fixes them), so they share its result."""
    kept: list[list[Task]] = []

    def load_kept(config: Config) -> list[Task]:
        if not kept:
            kept.append(load(config))
        return kept[0]
    return load_kept


def _plan_flags(given: dict[str, Any], values: list[float]) -> dict[str, Any]:
    """The sweep's stored settings but λ, resolved as a single run resolves them (so a bad
    flag, with any of the values, fails here, before anything is written)."""
    config = [Config.from_flags({**given, "reg_lambda": v}).to_dict() for v in values][0]
    return {k: v for k, v in config.items() if v is not None
            and k not in ("reg_lambda", "preprocessing")
            and not (k == "benchmark" and v == FOLDERS)}


def _read_plan(path: Path) -> dict[str, Any]:
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AppError(f"{path}: cannot read the sweep's plan ({first_line(exc)})") from None
    if not (isinstance(plan, dict) and isinstance(plan.get("reg_lambda"), list)
            and isinstance(plan.get("flags"), dict) and all(
                type(v) is float for v in plan["reg_lambda"])):
        raise AppError(f"{path}: not a sweep plan of this program")
    return plan


def _resumed_plan(root: Path, given: dict[str, Any], values: list[float]) -> dict[str, Any]:
    """The plan of the sweep in ``root``; the values and stored flags given must be its own."""
    plan = _read_plan(root / PLAN)
    if values and values != plan["reg_lambda"]:
        raise AppError(f"--resume: {root} holds a sweep of --reg_lambda {_show(plan['reg_lambda'])}"
                       f", not {_show(values)} (drop the values, or use another --output_dir)")
    for key in Config.stored_names():
        if key in given and given[key] != plan["flags"].get(key):
            raise AppError(f"--resume: the sweep in {root} was started with --{key} "
                           f"{plan['flags'].get(key)}, not {given[key]} (drop the flag, or use "
                           "another --output_dir)")
    return plan


def _new_plan(sweep_dir: RunDir, given: dict[str, Any], values: list[float],
              load: Callable[[Config], list[Task]]) -> dict[str, Any]:
    """Check the flags and the data, then (only then) clear and write the sweep's plan."""
    root = sweep_dir.root
    sweep_dir.prepare(create=False)
    flags = _plan_flags(given, values)
    old = [root / CHECKPOINT, root / PLAN, *(root / name(v) / CHECKPOINT for v in values)]
    if any(p.exists() for p in old) and not given.get("overwrite"):
        raise AppError(f"{root} already holds a run or a sweep: add --resume to continue it, "
                       "--overwrite to start over, or pick another --output_dir")
    load(Config.from_flags({**given, "reg_lambda": values[0]}))  # the data is good
    plan = {"reg_lambda": values, "flags": flags}
    sweep_dir.prepare(create=True)
    if given.get("overwrite"):
        _clear(sweep_dir)
    sweep_dir.write(PLAN, (json.dumps(plan, indent=2) + "\n").encode())
    return plan


def _clear(sweep_dir: RunDir) -> None:
    """--overwrite: remove the runs of the sweep planned in the folder (only the files this
    program writes), its own files, and a single run's files."""
    if sweep_dir.path(PLAN).exists():
        for value in _read_plan(sweep_dir.path(PLAN))["reg_lambda"]:
            folder = sweep_dir.path(name(value))
            RunDir(folder, sweep_dir.crash_test).clear()
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    sweep_dir.clear()
    for rel in (PLAN, SWEEP, SWEEP_PLOT):
        sweep_dir.path(rel).unlink(missing_ok=True)


def run_sweep(given: dict[str, Any], values: list[float], dist: Dist, run_one: RunOne,
              load: Callable[[Config], list[Task]]) -> list[dict[str, Any]]:
    """Every λ of the sweep in turn, as a single run each; returns sweep.json's rows."""
    if dist.active:
        raise AppError("a --reg_lambda sweep runs in one process: start it without torchrun "
                       "(or run one lambda per torchrun)")
    if given.get("resume") and given.get("overwrite"):
        raise AppError("give either --resume (continue the sweep) or --overwrite (start over)")
    crash_test = CrashTest.from_env()  # one count of kill points over the whole sweep
    sweep_dir = RunDir(Path(given.get("output_dir", Config().output_dir)), crash_test)
    resumed = bool(given.get("resume"))
    plan = (_resumed_plan(sweep_dir.root, given, values) if resumed
            else _new_plan(sweep_dir, given, values, load))
    kept = {k: v for k, v in given.items() if k not in Config.stored_names()
            and k not in ("resume", "overwrite", "output_dir")}
    rows = []
    for value in plan["reg_lambda"]:
        folder = sweep_dir.path(name(value))
        again = "resume" if resumed and (folder / CHECKPOINT).exists() else "overwrite"
        doc = run_one({**kept, **plan["flags"], "reg_lambda": value,
                       "output_dir": str(folder), again: True}, dist, load,
                      RunDir(folder, crash_test))
        rows.append({"reg_lambda": value, "avg_acc": doc["avg_acc"],
                     "avg_forgetting": doc["avg_forgetting"]})
        sweep_dir.write(SWEEP, (json.dumps(rows, indent=2) + "\n").encode())
    sweep_dir.write(SWEEP_PLOT, plot(rows))
    return rows


def report(rows: list[dict[str, Any]], root: str) -> str:
    """The table printed at the end of a sweep."""
    lines = [f"{'lambda':>10}  {'avg acc':>8}  {'avg forgetting':>14}"]
    for row in rows:
        forgetting = row["avg_forgetting"]
        lines.append(f"{row['reg_lambda']:>10g}  {row['avg_acc']:>7.2f}%  "
                     f"{'n/a' if forgetting is None else f'{forgetting:.2f}pp':>14}")
    lines.append(f"Saved in {root}/: {SWEEP}, {SWEEP_PLOT} and one folder per lambda "
                 f"({', '.join(name(r['reg_lambda']) + '/' for r in rows)})")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> bytes:
    """``sweep.png``: final average accuracy against average forgetting, one point per λ."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.2))
    axes = fig.subplots()
    x = [r["avg_forgetting"] or 0.0 for r in rows]  # None: a single task, nothing to forget
    y = [r["avg_acc"] for r in rows]
    axes.plot(x, y, "o", color="tab:blue")
    for r, xi, yi in zip(rows, x, y):
        axes.annotate(f"λ {r['reg_lambda']:g}", (xi, yi), textcoords="offset points",
                      xytext=(5, 4), fontsize=8)
    axes.set(xlabel="average forgetting (pp)", ylabel="final average accuracy (%)",
             title="λ sweep: accuracy against forgetting")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
