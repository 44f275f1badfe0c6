r"""compute_omega and omega_sums: batches in, Ω (paper Eq. 2) out; the one cross-process step."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from .hebbian import LocalEngine
from .per_sample import PerSampleEngine, squared_norm

ForwardFn = Callable[[nn.Module, Any], Any]
OutputFn = Callable[[Any], Any]


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
        ``{name: Ω}`` for every parameter with ``requires_grad``, on that parameter's device
        and in its dtype (float64 models are computed in float64). The model's training mode is
        restored; its parameters and ``.grad`` are not touched.

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
    if _has_dtensor_params(model):
        from ..sharded import compute_omega_sharded
        return compute_omega_sharded(model, loader, **kwargs)
    sums, count = omega_sums(model, loader, **kwargs)
    count = all_reduce_sums(sums, count)
    if count == 0:
        raise ValueError("compute_omega: the loader yielded no samples")
    params = dict(model.named_parameters())
    return {n: (s / count).to(params[n].dtype) for n, s in sums.items()}


def omega_sums(
    model: nn.Module,
    loader: Iterable,
    per_sample: bool = True,
    *,
    method: str = "global",
    forward_fn: Optional[ForwardFn] = None,
    output_fn: Optional[OutputFn] = None,
) -> Tuple[Dict[str, Tensor], int]:
    """This process's sums over its samples of what :func:`compute_omega` averages (Eq. 2 before
    dividing by N; the batch formula's or l-MAS's sums likewise), keyed by parameter name, as
    plain tensors of each parameter's full shape, and this process's sample count. No
    communication: :func:`compute_omega` is omega_sums, then :func:`all_reduce_sums`, then the
    division. Arguments as for :func:`compute_omega`."""
    if method not in ("global", "local"):
        raise ValueError(f"Invalid method: {method!r} (expected 'global' or 'local')")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("compute_omega: the model has no trainable parameters")
    device = next(iter(params.values())).device
    sums = {n: torch.zeros(p.shape, dtype=_acc_dtype(p), device=device)
            for n, p in params.items()}
    forward = _Forward(model, forward_fn, output_fn)
    if method == "local":
        engine = LocalEngine(model, params, forward)
    elif per_sample:
        engine = PerSampleEngine(model, params, forward)
    else:
        engine = _BatchFormula(params, forward)
    count = 0
    with _eval_mode(model):
        for batch in loader:
            batch = tree_map(lambda t: t.to(device).detach() if isinstance(t, Tensor) else t,
                             batch)
            n = _batch_size(batch)
            engine.accumulate(batch, n, sums)
            count += n
    return sums, count


def all_reduce_sums(sums: Dict[str, Tensor], count: int) -> int:
    """Sums and sample counts over all processes (in place; returns the total count); the
    identity when no process group is initialised."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or not sums:
        return count
    device = next(iter(sums.values())).device
    # One flat buffer: a single collective instead of one per parameter. The count rides along
    # so that uneven shards give the true mean, not a mean of the ranks' means.
    flat = torch.cat([s.reshape(-1).double() for s in sums.values()]
                     + [torch.tensor([float(count)], dtype=torch.float64, device=device)])
    dist.all_reduce(flat)
    offset = 0
    for s in sums.values():
        s.copy_(flat[offset:offset + s.numel()].view_as(s))
        offset += s.numel()
    return int(round(flat[-1].item()))


# ---------------------------------------------------------------------------- helpers

def _has_dtensor_params(model: nn.Module) -> bool:
    dist = torch.distributed
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)


def _acc_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _batch_size(batch: Any) -> int:
    first = next((t for t in tree_leaves(batch) if isinstance(t, Tensor)), None)
    if first is None or first.dim() == 0:
        raise TypeError(f"compute_omega: the loader must yield x, (x, y, ...) or a dict of "
                        f"model inputs, with x a tensor of samples; got {type(batch).__name__}")
    return first.shape[0]


class _Forward:
    """batch -> the tensors that make up F(x), by forward_fn and output_fn (or the defaults)."""

    def __init__(self, model: nn.Module, forward_fn: Optional[ForwardFn],
                 output_fn: Optional[OutputFn]) -> None:
        self.model, self.forward_fn, self.output_fn = model, forward_fn, output_fn

    def __call__(self, batch: Any) -> List[Tensor]:
        out = (self.forward_fn(self.model, batch) if self.forward_fn is not None
               else _call_model(self.model, batch))
        if self.output_fn is not None:
            leaves = [t for t in tree_leaves(self.output_fn(out)) if isinstance(t, Tensor)]
            if not leaves:
                raise TypeError("compute_omega: output_fn returned no tensor")
            return leaves
        if isinstance(out, Tensor):
            return [out]
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        if isinstance(logits, Tensor):
            return [logits]
        raise TypeError(f"compute_omega: the model returned a {type(out).__name__}; pass "
                        f"output_fn= to say which tensor is F(x) (e.g. output_fn=lambda out: "
                        f"out[0])")


def _call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return model(batch[0])
    raise TypeError(f"compute_omega: the loader must yield x, (x, y, ...) or a dict of model "
                    f"inputs, with x a tensor; got {type(batch).__name__} (or pass forward_fn=)")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _BatchFormula:
    """The original code's Ω: |gradient of the whole batch's Σ‖F(x_k)‖²|, summed over batches."""

    def __init__(self, params: Dict[str, Tensor], forward: _Forward) -> None:
        self.names, self.targets = list(params), list(params.values())
        self.forward = forward

    def accumulate(self, batch: Any, n: int, sums: Dict[str, Tensor]) -> None:
        with torch.enable_grad():
            grads = torch.autograd.grad(squared_norm(self.forward(batch)), self.targets,
                                        allow_unused=True)
        for name, g in zip(self.names, grads):
            if g is not None:
                sums[name].add_(g.abs().to(sums[name].dtype))
