"""Choosing the MAS penalty strength λ for a new task without test data or old tasks' data.

The continual hyperparameter framework of De Lange et al., "A continual learning survey:
Defying forgetting in classification tasks" (TPAMI 2021, Sec. 5.2, Algorithm 1):

1. *Maximal plasticity search*: fine-tune on the new task (λ = 0) from the current model and
   measure the accuracy A* on a validation split held out of the new task's training data.
2. *Stability decay*: train with a high λ from the same model; while the validation accuracy
   is below (1 − p)·A*, multiply λ by a decay factor α and train again.

The paper uses p = 0.2 and α = 0.5; the default margin here is 0.05 (measured, docs/lambda.md).
The paper also searches the learning rate in step 1 over a coarse grid; here the caller's
optimizer, learning rate included, is kept.

:func:`stability_decay` is the protocol over any "train with λ and give the validation accuracy"
function; :func:`select_reg_lambda` builds that function from a model, loaders and an optimizer
factory, training copies of the model (the model passed in is left untouched).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# p: the paper's 0.2 chose λ 10-1000x the best hand-tuned one on Split Digits and lost 10 points
# of final accuracy there; 0.05 came within 1-3 points of it (docs/lambda.md)
MARGIN = 0.05
FACTOR = 0.5  # α, the paper's decay factor
MAX_TRIES = 10  # λ values tried at most (the smallest is kept if none is within the margin)


@dataclass(frozen=True)
class LambdaSelection:
    """The outcome of :func:`stability_decay`.

    ``reg_lambda``: the first λ (from the start, decaying) whose validation accuracy reached
    ``threshold`` = (1 − margin)·``reference_accuracy``. When none of ``max_tries`` did
    (``within_margin`` False), the smallest λ tried: the search stops where the paper's loop
    would go on decaying. ``tries``: every (λ, validation accuracy) in the order trained, the
    λ = 0 reference first.
    """

    reg_lambda: float
    reference_accuracy: float
    threshold: float
    within_margin: bool
    tries: list[tuple[float, float]] = field(default_factory=list)


def _check(margin: float, start: float, factor: float, max_tries: int) -> None:
    if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
        raise ValueError(f"margin must be in [0, 1), not {margin!r}")
    if not (isinstance(start, (int, float)) and math.isfinite(start) and start > 0):
        raise ValueError(f"start must be a finite number > 0, not {start!r}")
    if not (isinstance(factor, (int, float)) and 0 < factor < 1):
        raise ValueError(f"factor must be in (0, 1), not {factor!r}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries must be a positive integer, not {max_tries!r}")


def stability_decay(validation_accuracy: Callable[[float], float], *, start: float,
                    margin: float = MARGIN, factor: float = FACTOR,
                    max_tries: int = MAX_TRIES) -> LambdaSelection:
    """The protocol over ``validation_accuracy(λ)``: train on the new task with penalty
    strength λ from the current model and return the accuracy on the held-out validation split.
    It is called with 0.0 first (A*), then with ``start``, ``start·factor``, ... until an
    accuracy reaches (1 − ``margin``)·A*, at most ``max_tries`` times after the reference.
    ``validation_accuracy`` must be deterministic in λ for the choice to be reproducible."""
    _check(margin, start, factor, max_tries)
    reference = float(validation_accuracy(0.0))
    threshold = (1.0 - margin) * reference
    tries = [(0.0, reference)]
    reg_lambda = float(start)
    for k in range(max_tries):
        if k:
            reg_lambda *= factor
        accuracy = float(validation_accuracy(reg_lambda))
        tries.append((reg_lambda, accuracy))
        if accuracy >= threshold:
            return LambdaSelection(reg_lambda, reference, threshold, True, tries)
    return LambdaSelection(reg_lambda, reference, threshold, False, tries)


def _accuracy(model: nn.Module, batches: Iterable[Any],
              forward: Callable[[nn.Module, Any], torch.Tensor]) -> float:
    """Top-1 accuracy in percent of ``forward``'s logits against each batch's ``batch[1]``."""
    was_training, correct, total = model.training, 0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            pred = forward(model, batch).argmax(dim=1)
            correct += int((pred == batch[1].to(pred.device)).sum())
            total += len(batch[1])
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def select_reg_lambda(
        model: nn.Module, train_batches: Iterable[Any], val_batches: Iterable[Any],
        make_optimizer: Callable[[nn.Module, float], torch.optim.Optimizer], *,
        epochs: int = 1, start: float, margin: float = MARGIN, factor: float = FACTOR,
        max_tries: int = MAX_TRIES,
        forward: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> LambdaSelection:
    """Choose λ for the next task by :func:`stability_decay`, training copies of ``model``.

    Each try deep-copies ``model`` (the model passed in is never changed), builds its optimizer
    with ``make_optimizer(copy, λ)`` (e.g. ``LocalSgd(copy.named_parameters(),
    reg_params=reg_params, reg_lambda=λ, lr=...)``, or any optimizer with
    ``add_mas_penalty(opt, reg_params, reg_lambda=λ)``), trains ``epochs`` passes over
    ``train_batches`` (the new task's data without its validation split; re-iterable, e.g. a
    DataLoader) minimising ``loss_fn(forward(copy, batch), batch[1])``, and measures accuracy on
    ``val_batches``. ``forward`` defaults to ``model(batch[0])``; batches should be on the
    model's device. Return the selection; train the model itself with its ``reg_lambda``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, not {epochs!r}")
    _check(margin, start, factor, max_tries)
    run = forward or (lambda m, batch: m(batch[0]))

    def validation_accuracy(reg_lambda: float) -> float:
        trained = copy.deepcopy(model)
        trained.train()
        optimizer = make_optimizer(trained, reg_lambda)
        for _ in range(epochs):
            for batch in train_batches:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(run(trained, batch), batch[1]).backward()
                optimizer.step()
        return _accuracy(trained, val_batches, run)

    return stability_decay(validation_accuracy, start=start, margin=margin, factor=factor,
                           max_tries=max_tries)
