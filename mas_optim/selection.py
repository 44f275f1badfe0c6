"""Choosing the MAS penalty strength λ for a new task without test data or old tasks' data.

The continual hyperparameter framework of De Lange et al., "A continual learning survey:
Defying forgetting in classification tasks" (TPAMI 2021, Sec. 5.2, Algorithm 1):

1. *Maximal plasticity search*: fine-tune on the new task (λ = 0) from the current model and
   measure the reference score A* on a validation split held out of the new task's training
   data.
2. *Stability decay*: train with a high λ from the same model; while the validation score is
   below (1 − p)·A*, multiply λ by a decay factor α and train again.

The paper measures accuracy, with p = 0.2 and α = 0.5. The defaults here (docs/lambda.md, where
they were measured) measure the *likelihood*, 100·exp(−mean cross-entropy): the geometric mean
of the probability given to the correct class, in percent. It moves smoothly with λ where the
accuracy of a small validation split moves by whole samples or not at all, and its margin is one
on the loss: (1 − p)·A* ⇔ cross-entropy within −ln(1 − p) nats of fine-tuning's. p = 0.1, α =
10^(−1/2) (two tries a decade) and at most 7 tries (three decades below the start). The paper
also searches the learning rate in step 1 over a coarse grid; here the caller's optimizer,
learning rate included, is kept.

:func:`stability_decay` is the protocol over any "train with λ and give the validation score"
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

# measured in docs/lambda.md: the accuracy of a few hundred held-out samples is too coarse to
# tell λ apart near fine-tuning's; the likelihood is not
MEASURES = ("likelihood", "accuracy")
MEASURE = "likelihood"
MARGIN = 0.1  # p; the paper's 0.2 (on accuracy) chose λ 10-1000x the best hand-tuned one
FACTOR = 10 ** -0.5  # α: two tries a decade (the paper's 0.5: three)
# λ values tried at most, the smallest kept if none is within the margin. The protocol sees the
# new task only, never forgetting, so without a floor it decays λ towards fine-tuning where every
# λ costs plasticity (Permuted Digits: λ 0.03, 5-11pp forgetting); three decades stop it there
MAX_TRIES = 7


@dataclass(frozen=True)
class LambdaSelection:
    """The outcome of :func:`stability_decay`.

    ``reg_lambda``: the first λ (from the start, decaying) whose validation score reached
    ``threshold`` = (1 − margin)·``reference`` (A*, fine-tuning's score). When none of
    ``max_tries`` did (``within_margin`` False), the smallest λ tried: the search stops where
    the paper's loop would go on decaying. ``tries``: every (λ, validation score) in the order
    trained, the λ = 0 reference first.
    """

    reg_lambda: float
    reference: float
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


def stability_decay(validation_score: Callable[[float], float], *, start: float,
                    margin: float = MARGIN, factor: float = FACTOR,
                    max_tries: int = MAX_TRIES) -> LambdaSelection:
    """The protocol over ``validation_score(λ)``: train on the new task with penalty strength
    λ from the current model and return a score on the held-out validation split, higher is
    better (accuracy or likelihood, in percent). It is called with 0.0 first (A*), then with
    ``start``, ``start·factor``, ... until a score reaches (1 − ``margin``)·A*, at most
    ``max_tries`` times after the reference. ``validation_score`` must be deterministic in λ
    for the choice to be reproducible."""
    _check(margin, start, factor, max_tries)
    reference = float(validation_score(0.0))
    threshold = (1.0 - margin) * reference
    tries = [(0.0, reference)]
    for k in range(max_tries):
        # start·factor^k to 12 digits: 100, not the 100.00000000000001 of repeated products
        reg_lambda = float(f"{start * factor ** k:.12g}")
        score = float(validation_score(reg_lambda))
        tries.append((reg_lambda, score))
        if score >= threshold:
            return LambdaSelection(reg_lambda, reference, threshold, True, tries)
    return LambdaSelection(reg_lambda, reference, threshold, False, tries)


def validation_scores(model: nn.Module, batches: Iterable[Any],
                      forward: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None
                      ) -> dict[str, float]:
    """The model's scores on labelled batches, in eval mode and without gradients (its mode is
    restored): ``accuracy``, top-1 in percent, and ``likelihood``, 100·exp(−mean cross-entropy),
    the geometric mean of the probability given to the correct class, in percent (0 when the
    logits are NaN, as after a diverged training). The logits are ``forward(model, batch)``
    (default ``model(batch[0])``), the labels ``batch[1]``."""
    run = forward or (lambda m, batch: m(batch[0]))
    was_training, correct, nll, total = model.training, 0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = run(model, batch)
            y = batch[1].to(logits.device)
            correct += int((logits.argmax(dim=1) == y).sum())
            nll += float(F.cross_entropy(logits.double(), y, reduction="sum"))
            total += len(y)
    model.train(was_training)
    total = max(total, 1)
    # a try that diverged (NaN logits) gives the correct class no probability
    likelihood = 0.0 if math.isnan(nll) else 100.0 * math.exp(-nll / total)
    return {"accuracy": 100.0 * correct / total, "likelihood": likelihood}


def select_reg_lambda(
        model: nn.Module, train_batches: Iterable[Any], val_batches: Iterable[Any],
        make_optimizer: Callable[[nn.Module, float], torch.optim.Optimizer], *,
        epochs: int = 1, start: float, margin: float = MARGIN, factor: float = FACTOR,
        max_tries: int = MAX_TRIES, measure: str = MEASURE,
        forward: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> LambdaSelection:
    """Choose λ for the next task by :func:`stability_decay`, training copies of ``model``.

    Each try deep-copies ``model`` (the model passed in is never changed), builds its optimizer
    with ``make_optimizer(copy, λ)`` (e.g. ``LocalSgd(copy.named_parameters(),
    reg_params=reg_params, reg_lambda=λ, lr=...)``, or any optimizer with
    ``add_mas_penalty(opt, reg_params, reg_lambda=λ)``), trains ``epochs`` passes over
    ``train_batches`` (the new task's data without its validation split; re-iterable, e.g. a
    DataLoader) minimising ``loss_fn(forward(copy, batch), batch[1])``, and scores it on
    ``val_batches`` by ``measure``: ``"likelihood"`` (the default) or ``"accuracy"`` (the
    paper's), see :func:`validation_scores`. ``forward`` defaults to ``model(batch[0])``;
    batches should be on the model's device. Return the selection; train the model itself with
    its ``reg_lambda``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, not {epochs!r}")
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, not {measure!r}")
    _check(margin, start, factor, max_tries)
    run = forward or (lambda m, batch: m(batch[0]))

    def validation_score(reg_lambda: float) -> float:
        trained = copy.deepcopy(model)
        trained.train()
        optimizer = make_optimizer(trained, reg_lambda)
        for _ in range(epochs):
            for batch in train_batches:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(run(trained, batch), batch[1]).backward()
                optimizer.step()
        return validation_scores(trained, val_batches, run)[measure]

    return stability_decay(validation_score, start=start, margin=margin, factor=factor,
                           max_tries=max_tries)
