r"""compute_omega: the public entry point of the importance pass (paper Eq. 2)."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

from torch import Tensor, nn

from .._validate import is_sharded
from .engine import ForwardFn, OutputFn, all_reduce_sums, omega_sums


def compute_omega(
    model: nn.Module,
    loader: Iterable,
    per_sample: bool = True,
    *,
    method: str = "global",
    forward_fn: Optional[ForwardFn] = None,
    output_fn: Optional[OutputFn] = None,
) -> Dict[str, Tensor]:
    r"""Importance Ω of every trainable parameter of ``model`` on the data in ``loader``.

    .. math::
        \Omega = \frac{1}{N} \sum_{k=1}^{N} \left|
            \frac{\partial \lVert F(x_k; \theta) \rVert_2^2}{\partial \theta} \right|
        \qquad \text{(paper Eq. 2)}

    Args:
        model: the network F after training on a task.
        loader: an iterable of batches. A batch is a tensor ``x`` (``model(x)``), a tuple or list
            ``(x, y, ...)`` (``model(x)``; labels are ignored, MAS needs none) or a dict
            (``model(**batch)``, e.g. a tokenizer's output). The batch size is the size of dim 0
            of its first tensor; every tensor in the batch with that size on dim 0 holds one row
            per sample, the others are shared by all samples.
        per_sample: ``True`` (default): paper Eq. 2, (1/N) Σ_k |∂‖F(x_k)‖²/∂θ|.
            ``False``: the original code's batch formula, (1/N) Σ_batches |∂ Σ_{k∈b}‖F(x_k)‖²/∂θ|
            (not the same number).
        method: ``"global"`` (default): Eq. 2 on the network's output F.
            ``"local"``: local MAS (l-MAS, paper Sec. 4), Eq. 2 applied to each ``nn.Linear`` and
            ``nn.Conv2d`` layer's own function F_l(a) = W a + b instead of F. Its gradient,
            ∂‖F_l(a)‖²/∂W_ij = 2 z_i a_j, is the product of the two activities the connection
            joins (input a_j, output z_i), the Hebbian form, so only forward passes are needed:
            Ω_ij = (2/N) Σ_k |z_i(x_k)| |a_j(x_k)|. Where a weight is used at many positions
            (convolutions, sequences) the co-activations at every position are summed, each
            in magnitude. Biases get (2/N) Σ_k |z_i(x_k)|. Parameters of other modules
            (BatchNorm, ...) get their global Ω. ``per_sample`` is ignored.
        forward_fn: ``forward_fn(model, batch) -> output``, for models called otherwise, e.g.
            with task labels: ``forward_fn=lambda model, b: model(b[0], b[2])`` for an Avalanche
            ``MultiTaskModule`` fed ``(x, y, t)`` batches.
        output_fn: ``output_fn(output) -> F(x)``: a tensor, or a tuple/list/dict of tensors
            whose squared norms are summed. Without it, a model's output must be a tensor or
            carry a ``logits`` entry or attribute (e.g. a Hugging Face ``ModelOutput``).

    Returns:
        ``{name: Ω}`` for every parameter with ``requires_grad``: plain tensors (no autograd
        graph), on that parameter's device and in its dtype (float64 models are computed in
        float64). The model's training mode is restored; its parameters and ``.grad`` are not
        touched. A ``torch.compile``'d model runs eagerly for the pass, its names unchanged
        (``_orig_mod.`` ...).

    The model runs in eval mode (BatchNorm uses its running statistics, dropout is off), so a
    batch is processed as its samples would be one by one; how the exact per-sample values come
    from one batched pass is in :mod:`mas_optim.importance`. Which dimension of each module's
    tensors holds the samples is proven from the data flow once per batch signature (shapes and
    dtypes of the batch and of every module call, the modules that ran) within one call and
    reused for later batches with the same signature; control flow that depends on the data's
    values and moves the samples without changing the signature is the limit
    (:mod:`mas_optim.importance.per_sample`).

    When ``torch.distributed`` is initialised, every rank passes its own shard of the data and the
    per-rank sums and sample counts are all-reduced: each rank returns Ω over all the data.
    A model whose parameters are DTensors (``fully_shard``) gets Ω sharded like them
    (:func:`mas_optim.sharded.compute_omega_sharded`).
    """
    kwargs = dict(per_sample=per_sample, method=method, forward_fn=forward_fn,
                  output_fn=output_fn)
    if any(is_sharded(p) for p in model.parameters() if p.requires_grad):
        from .fsdp import compute_omega_sharded  # imports torch.distributed.tensor: on first use
        return compute_omega_sharded(model, loader, **kwargs)
    sums, count = omega_sums(model, loader, **kwargs)
    count = all_reduce_sums(sums, count)
    if count == 0:
        raise ValueError("compute_omega: the loader yielded no samples")
    params = dict(model.named_parameters())
    return {n: (s / count).to(params[n].dtype) for n, s in sums.items()}
