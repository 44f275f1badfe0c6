r"""omega_sums: batches in, the per-parameter sums of Eq. 2 out; all_reduce_sums: the one
cross-process step (:func:`~mas_optim.importance.compute_omega` is the two, then the mean)."""

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
    # A torch.compile'd model (or submodule) runs eagerly: the pass hooks modules and swaps
    # parameters (torch.func), which compiled code would trace (and dynamo refuses); the names
    # stay the compiled module's (``_orig_mod.`` ...), as its optimizer and reg_params see them.
    with _eval_mode(model), torch.compiler.set_stance("force_eager"):
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
