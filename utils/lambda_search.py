"""``--reg_lambda auto``: λ chosen per task by the continual hyperparameter framework of De Lange
et al. (TPAMI 2021), ``mas_optim.stability_decay``.

Before task t (t >= 2; task 1 has no penalty, Ω is still zero) a validation split of
``--auto_val_fraction`` is held out of task t's own training data. The current model is trained
on the rest for ``--num_epochs`` with λ = 0 (A*, maximal plasticity), then with
``--auto_start``, decayed by ``--auto_factor`` until the validation score (``--auto_measure``:
likelihood or accuracy) reaches (1 − ``--auto_margin``)·A*. Task t is then trained on all its
training data with that λ. No test data and no data of earlier tasks is used. ``--auto_fit
first`` searches before task 2 only and keeps that λ (Lee et al. 2024, "Hyperparameter
Selection in Continual Learning").

The chosen λ per task is part of the run state (``RunState.lambdas``, committed right after the
search, so a resume never searches twice) and of results.json (``reg_lambda_per_task``).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils.data import Dataset, Subset

import mas_optim
from utils import AppError
from utils.checkpoint import CrashTest, RunDir, RunState
from utils.data import derived_seed, make_loader
from utils.folders import ImageFolderSplit

if TYPE_CHECKING:
    from utils.trainer import Trainer

AUTO = "auto"
FITS = ("every", "first")
MEASURES = mas_optim.selection.MEASURES
# mas_optim.selection's measured defaults (docs/lambda.md); the start far above the best
# hand-tuned λ of the digits benchmarks (0.3 to 30), the paper's validation fraction
DEFAULTS: dict[str, Any] = dict(auto_measure=mas_optim.selection.MEASURE,
                                auto_margin=mas_optim.selection.MARGIN, auto_start=1000.0,
                                auto_factor=mas_optim.selection.FACTOR,
                                auto_tries=mas_optim.selection.MAX_TRIES,
                                auto_val_fraction=0.2, auto_fit="every")


def parse_lambda(text: str) -> float | str:
    """One ``--reg_lambda`` value: ``auto`` or a finite number >= 0."""
    if text == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'auto'") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0 (or 'auto')")
    return value


def _between(low: float, high: float, low_closed: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low <= value < high if low_closed else low < value < high):
            raise argparse.ArgumentTypeError(
                f"{text} must be in {'[' if low_closed else '('}{low:g}, {high:g})")
        return value
    return parse


MARGIN, FACTOR_OR_FRACTION = _between(0, 1, True), _between(0, 1, False)
START = _between(0, math.inf, False)


def settle(values: dict[str, Any]) -> dict[str, Any]:
    """A new run's settings: the search's defaults with ``--reg_lambda auto``; its flags given
    without it are an error."""
    if values.get("reg_lambda") == AUTO:
        return {**DEFAULTS, **{k: v for k, v in values.items() if v is not None}}
    given = [k for k in DEFAULTS if values.get(k) is not None]
    if given:
        raise AppError(f"--{given[0]} applies to --reg_lambda auto only")
    return values


def lambda_of(reg_lambda: float | str, state: RunState) -> float:
    """λ of the state's task: the flag's, or with auto the one chosen for it (0 for task 1)."""
    if reg_lambda != AUTO:
        return float(reg_lambda)
    chosen = state.lambdas[state.task] if state.task < len(state.lambdas) else None
    return 0.0 if chosen is None else chosen


def before_task(trainer: Trainer, state: RunState) -> RunState:
    """With auto and no λ yet for the state's task: choose it and commit it."""
    cfg, t = trainer.config, state.task
    if cfg.reg_lambda != AUTO or t < len(state.lambdas):
        return state
    if t == 0:
        chosen = None  # Ω is zero: no penalty whatever λ
    elif t > 1 and cfg.auto_fit == "first":
        chosen = state.lambdas[1]
    else:
        chosen = search(trainer, state).reg_lambda
    state = replace(state, lambdas=[*state.lambdas, chosen])
    trainer.commit(state)
    return state


def split(train: Dataset, fraction: float, seed: int, t: int) -> tuple[Subset, Subset]:
    """Task ``t``'s training data as (train, validation): a fixed random ``fraction`` held out."""
    n = len(train)  # type: ignore[arg-type]
    held = round(fraction * n)
    if not 0 < held < n:
        raise AppError(f"--auto_val_fraction {fraction}: holds out {held} of the {n} training "
                       f"samples of task {t + 1}; at least one must be on each side")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(
        derived_seed(seed, "validation", t))).tolist()
    # the held-out part is measured as test data is: without the training split's random flip
    unaugmented = train.unaugmented() if isinstance(train, ImageFolderSplit) else train
    return Subset(train, sorted(order[held:])), Subset(unaugmented, sorted(order[:held]))


def search(trainer: Trainer, state: RunState) -> mas_optim.LambdaSelection:
    """The protocol before the state's task, on its training data alone; logs every try."""
    from utils.trainer import log  # here: utils.trainer imports this module

    cfg, t = trainer.config, state.task
    train, val = split(trainer.tasks[t].train, cfg.auto_val_fraction, cfg.seed, t)
    tasks = list(trainer.tasks)
    tasks[t] = replace(tasks[t], train=train)
    label = f"task {t + 1}/{len(tasks)} ({tasks[t].name}) lambda search"

    def validation_score(reg_lambda: float) -> float:
        # a trainer of its own: no kill points, nothing written, the run's RNG untouched
        sub = type(trainer)(replace(cfg, reg_lambda=reg_lambda), tasks,
                            RunDir(trainer.run_dir.root, CrashTest(None)), trainer.device,
                            trainer.dist)
        sub.tasks = tasks  # already as --scenario trains them: not relabelled a second time
        cuda = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(derived_seed(cfg.seed, "search", t))
            model, optimizer, penalty, scheduler, _ = sub.restore(state)
            for epoch in range(cfg.num_epochs):
                sub.train_epoch(model, optimizer, penalty, t, epoch, label)
                scheduler.step()
        scores = mas_optim.selection.validation_scores(
            model, make_loader(val, cfg.batch_size),
            lambda m, batch: m(batch[0].to(trainer.device)))
        log(f"{label}: lambda {reg_lambda:g}, validation likelihood "
            f"{scores['likelihood']:.2f}%, accuracy {scores['accuracy']:.2f}%")
        return scores[cfg.auto_measure]

    chosen = mas_optim.stability_decay(
        validation_score, start=cfg.auto_start, margin=cfg.auto_margin,
        factor=cfg.auto_factor, max_tries=cfg.auto_tries)
    log(f"{label}: chose lambda {chosen.reg_lambda:g} ({cfg.auto_measure} A* "
        f"{chosen.reference:.2f}%, "
        f"threshold {chosen.threshold:.2f}%, {len(chosen.tries)} trainings"
        + ("" if chosen.within_margin else "; none reached the threshold: the smallest tried")
        + ")")
    return chosen
