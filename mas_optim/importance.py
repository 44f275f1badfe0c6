r"""compute_omega: MAS parameter importance (paper Eq. 2), exact and fast.

.. math::
    \Omega_{ij} = \frac{1}{N} \sum_{k=1}^{N} \left|
        \frac{\partial \lVert F(x_k; \theta) \rVert_2^2}{\partial \theta_{ij}} \right|

The absolute value sits *inside* the mean over samples, so the gradient of a whole batch
(which sums before the absolute value) is a different quantity. The original code took batch
size 1 to get it; here one batched forward and backward gives it exactly:

* ``nn.Linear``: the per-sample gradient of W is the outer product g_k a_kᵀ of the layer's output
  gradient and input, and |g_k a_kᵀ| = |g_k| |a_k|ᵀ, so Σ_k |g_k a_kᵀ| = |G|ᵀ|A| is one matmul.
* ``nn.Conv2d``: the per-sample gradient is g_k U_kᵀ over the unfolded input U_k; it is formed
  for a few samples at a time (bounded memory), its absolute value summed over samples.
* Every other trainable parameter (BatchNorm's, an embedding's, a module called twice per
  forward, ...) takes a correct, slower path: one forward and backward per sample.

The model runs in eval mode (BatchNorm uses its running statistics, dropout is off), so a batch
is processed exactly as its samples would be one by one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Per-sample gradients are formed for at most this many elements at once (Conv2d, sequences).
_PER_SAMPLE_BUDGET = 1 << 22


def compute_omega(
    model: nn.Module,
    loader: Iterable,
    per_sample: bool = True,
    *,
    method: str = "global",
) -> Dict[str, Tensor]:
    """Importance Ω of every trainable parameter of ``model`` on the data in ``loader``.

    Args:
        model: the network F after training on a task (its output is F(x)).
        loader: yields ``x`` or tuples ``(x, y, ...)``; labels are ignored (MAS needs none).
            The first dimension of ``x`` indexes samples.
        per_sample: ``True`` (default): paper Eq. 2, (1/N) Σ_k |∂‖F(x_k)‖²/∂θ|.
            ``False``: the original code's batch formula, (1/N) Σ_batches |∂ Σ_{k∈b}‖F(x_k)‖²/∂θ|
            (cheaper on models without a fast path, and not the same number).
        method: ``"global"`` (default): Eq. 2 on the network's output F.
            ``"local"``: local MAS (l-MAS, paper Sec. 4), Eq. 2 applied to each ``nn.Linear`` and
            ``nn.Conv2d`` layer's own function F_l(a) = W a + b instead of F. Its gradient,
            ∂‖F_l(a)‖²/∂W_ij = 2 z_i a_j, is the product of the two activities the connection
            joins (input a_j, output z_i), the Hebbian form, so only forward passes are needed:
            Ω_ij = (2/N) Σ_k |z_i(x_k)| |a_j(x_k)|. Where a weight is used at many positions
            (convolutions, sequences) the co-activations at every position are summed, each
            in magnitude. Biases get (2/N) Σ_k |z_i(x_k)|. Parameters of other modules
            (BatchNorm, ...) get their global Ω. ``per_sample`` is ignored.

    Returns:
        ``{name: Ω}`` for every parameter with ``requires_grad``, on that parameter's device.
        The model's training mode is restored; its parameters and ``.grad`` are not touched.

    When ``torch.distributed`` is initialised, every rank passes its own shard of the data and the
    per-rank sums and sample counts are all-reduced: each rank returns Ω over all the data.
    """
    if method not in ("global", "local"):
        raise ValueError(f"Invalid method: {method!r} (expected 'global' or 'local')")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("compute_omega: the model has no trainable parameters")
    device = next(iter(params.values())).device
    sums = {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}
    if method == "local":
        engine = _LocalEngine(model, params)
    elif per_sample:
        engine = _PerSampleEngine(model, params)
    else:
        engine = _BatchFormula(model, params)
    count = 0
    with _eval_mode(model):
        for batch in loader:
            x = _inputs(batch).to(device).detach()
            engine.accumulate(x, sums)
            count += x.shape[0]
    count = _all_reduce(sums, count, device)
    if count == 0:
        raise ValueError("compute_omega: the loader yielded no samples")
    return {n: (s / count).to(params[n].dtype) for n, s in sums.items()}


# ---------------------------------------------------------------------------- helpers

def _acc_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _inputs(batch) -> Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError(f"compute_omega: the loader must yield x or (x, y, ...), with x a "
                        f"tensor; got {type(x).__name__}")
    return x


def _squared_output_norm(model: nn.Module, x: Tensor) -> Tensor:
    """Σ_k ‖F(x_k)‖²: its gradient for sample k alone is that of ‖F(x_k)‖² (eval mode)."""
    out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"compute_omega: the model must return a tensor, got {type(out).__name__}")
    return out.float().square().sum()


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

    def __init__(self, model: nn.Module, params: Dict[str, Tensor]) -> None:
        self.model, self.names = model, list(params)
        self.targets = list(params.values())

    def accumulate(self, x: Tensor, sums: Dict[str, Tensor]) -> None:
        with torch.enable_grad():
            grads = torch.autograd.grad(_squared_output_norm(self.model, x), self.targets,
                                        allow_unused=True)
        for n, g in zip(self.names, grads):
            if g is not None:
                sums[n].add_(g.abs())


def _all_reduce(sums: Dict[str, Tensor], count: int, device: torch.device) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return count
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


# ---------------------------------------------------------------------------- per-sample engine

class _PerSampleEngine:
    """Exact per-sample |gradient| sums from one batched forward and backward."""

    def __init__(self, model: nn.Module, params: Dict[str, Tensor]) -> None:
        self.model = model
        self.params = params
        name_of = {id(p): n for n, p in params.items()}
        owners: Dict[int, int] = {}
        for m in model.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        # module -> {"weight": name, "bias": name} for its trainable parameters
        self.fast: Dict[nn.Module, Dict[str, str]] = {}
        for m in model.modules():
            if not _has_fast_rule(m):
                continue
            own = {k: name_of[id(p)] for k, p in m.named_parameters(recurse=False)
                   if id(p) in name_of}
            if own and all(owners[id(getattr(m, k))] == 1 for k in own):
                self.fast[m] = own

    def _fallback_names(self) -> List[str]:
        covered = {n for own in self.fast.values() for n in own.values()}
        return [n for n in self.params if n not in covered]

    def accumulate(self, x: Tensor, sums: Dict[str, Tensor]) -> None:
        captured: Dict[nn.Module, List] = {}
        while self.fast:
            captured = self._batched_pass(x)
            if captured is not None:
                break  # else a module ran other than once per sample: it was demoted, redo
        for m, (a, g) in captured.items():
            if g is not None:
                _FAST_RULES[type(m)](m, a, g, self.fast[m], sums)
        fallback = self._fallback_names()
        if fallback:
            self._per_sample_loop(x, fallback, sums)

    def _batched_pass(self, x: Tensor) -> Optional[Dict[nn.Module, List]]:
        captured = {}
        calls: Dict[nn.Module, int] = {}

        def hook(m: nn.Module, inputs: Tuple, out: Tensor) -> None:
            calls[m] = calls.get(m, 0) + 1
            slot = [inputs[0].detach(), None]
            captured[m] = slot
            if out.requires_grad:
                # A tensor hook sees the gradient of this very output, even if a later
                # in-place op (ReLU(inplace=True)) rewrites the tensor.
                out.register_hook(lambda g: slot.__setitem__(1, g.detach()))

        handles = [m.register_forward_hook(hook) for m in self.fast]
        try:
            with torch.enable_grad():
                loss = _squared_output_norm(self.model, x)
                bad = [m for m, c in calls.items() if c != 1 or captured[m][0].shape[0] != len(x)]
                if bad:
                    for m in bad:
                        del self.fast[m]
                    return None
                targets = self._targets(captured)
                if targets:
                    torch.autograd.grad(loss, targets, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        return captured

    def _targets(self, captured: Dict[nn.Module, List]) -> List[Tensor]:
        # Backpropagate only as far as needed: to the fallback parameters and, for a fast module
        # whose input needs no gradient (it is the first trainable one on its path), to one of
        # its own parameters. Every fast module's output gradient is computed on the way; no
        # weight gradient of a fast module beyond those is formed.
        targets = [self.params[n] for n in self._fallback_names()]
        for m, (a, _) in captured.items():
            if not a.requires_grad:
                own = self.fast[m]
                targets.append(self.params[own.get("bias", own.get("weight"))])
        return targets

    def _per_sample_loop(self, x: Tensor, names: List[str], sums: Dict[str, Tensor]) -> None:
        targets = [self.params[n] for n in names]
        for k in range(x.shape[0]):
            with torch.enable_grad():
                grads = torch.autograd.grad(_squared_output_norm(self.model, x[k:k + 1]), targets,
                                            allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    sums[n].add_(g.abs())


def _has_fast_rule(m: nn.Module) -> bool:
    # Exact types only: a subclass may change forward(). Conv2d needs zero, explicit padding
    # so that unfold reproduces it.
    if type(m) is nn.Linear:
        return True
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _linear_rule(m: nn.Linear, a: Tensor, g: Tensor, own: Dict[str, str],
                 sums: Dict[str, Tensor]) -> None:
    if a.dim() == 2:
        if "weight" in own:
            acc = sums[own["weight"]]
            acc.addmm_(g.abs().t().to(acc.dtype), a.abs().to(acc.dtype))  # += |G|ᵀ|A|
        if "bias" in own:
            sums[own["bias"]].add_(g.abs().sum(0).to(sums[own["bias"]]))
        return
    # Inputs (B, ..., in): sample k's gradient sums over its positions before the |.|.
    a = a.reshape(a.shape[0], -1, a.shape[-1])
    g = g.reshape(g.shape[0], -1, g.shape[-1])
    if "weight" in own:
        _sum_abs_per_sample(lambda s: g[s].transpose(1, 2).bmm(a[s]), a.shape[0],
                            m.weight.numel(), sums[own["weight"]])
    if "bias" in own:
        sums[own["bias"]].add_(g.sum(1).abs().sum(0).to(sums[own["bias"]]))


def _conv2d_rule(m: nn.Conv2d, a: Tensor, g: Tensor, own: Dict[str, str],
                 sums: Dict[str, Tensor]) -> None:
    if "weight" in own:
        B, G = a.shape[0], m.groups
        u = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        u = u.reshape(B, G, -1, u.shape[-1])              # (B, G, Cin/G·kh·kw, L)
        gg = g.reshape(B, G, -1, u.shape[-1])             # (B, G, Cout/G, L)
        acc = sums[own["weight"]]
        _sum_abs_per_sample(lambda s: gg[s].matmul(u[s].transpose(2, 3)), B,
                            m.weight.numel(), acc.view(G, -1, acc[0].numel()))
    if "bias" in own:
        sums[own["bias"]].add_(g.sum((2, 3)).abs().sum(0).to(sums[own["bias"]]))


def _sum_abs_per_sample(per_sample_grad, n: int, numel: int, acc: Tensor) -> None:
    """acc += Σ_k |grad_k|, forming the per-sample gradients a few samples at a time."""
    step = max(1, _PER_SAMPLE_BUDGET // max(numel, 1))
    for start in range(0, n, step):
        acc.add_(per_sample_grad(slice(start, start + step)).abs().sum(0).reshape(acc.shape))


_FAST_RULES = {nn.Linear: _linear_rule, nn.Conv2d: _conv2d_rule}


# ---------------------------------------------------------------------------- local MAS

class _LocalEngine:
    """l-MAS (paper Sec. 4): Hebbian importance from one forward pass, no backward."""

    def __init__(self, model: nn.Module, params: Dict[str, Tensor]) -> None:
        self.model = model
        name_of = {id(p): n for n, p in params.items()}
        self.layers: Dict[nn.Module, Dict[str, str]] = {}
        for m in model.modules():
            if _has_fast_rule(m):
                own = {k: name_of[id(p)] for k, p in m.named_parameters(recurse=False)
                       if id(p) in name_of}
                if own:
                    self.layers[m] = own
        covered = {n for own in self.layers.values() for n in own.values()}
        rest = {n: p for n, p in params.items() if n not in covered}
        self.rest = _PerSampleEngine(model, rest) if rest else None

    def accumulate(self, x: Tensor, sums: Dict[str, Tensor]) -> None:
        def hook(m: nn.Module, inputs: Tuple, out: Tensor) -> None:
            _HEBBIAN_RULES[type(m)](m, inputs[0].detach(), out.detach(), self.layers[m], sums)

        handles = [m.register_forward_hook(hook) for m in self.layers]
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        if self.rest is not None:
            self.rest.accumulate(x, sums)


def _hebbian_linear(m: nn.Linear, a: Tensor, z: Tensor, own: Dict[str, str],
                    sums: Dict[str, Tensor]) -> None:
    a = a.reshape(-1, a.shape[-1]).abs()       # every position of every sample: (M, in)
    z = z.reshape(-1, z.shape[-1]).abs()       # (M, out)
    if "weight" in own:
        sums[own["weight"]].add_(z.t().mm(a).mul_(2).to(sums[own["weight"]]))   # 2|Z|ᵀ|A|
    if "bias" in own:
        sums[own["bias"]].add_(z.sum(0).mul_(2).to(sums[own["bias"]]))


def _hebbian_conv2d(m: nn.Conv2d, a: Tensor, z: Tensor, own: Dict[str, str],
                    sums: Dict[str, Tensor]) -> None:
    B, G = a.shape[0], m.groups
    if "weight" in own:
        u = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        L = u.shape[-1]
        # (G, B·L, Cin/G·kh·kw) and (G, Cout/G, B·L): one batched matmul over the groups
        u = u.abs().reshape(B, G, -1, L).permute(1, 0, 3, 2).reshape(G, B * L, -1)
        zz = z.abs().reshape(B, G, -1, L).permute(1, 2, 0, 3).reshape(G, -1, B * L)
        acc = sums[own["weight"]]
        acc.view(G, -1, acc[0].numel()).add_(zz.bmm(u).mul_(2).to(acc))
    if "bias" in own:
        sums[own["bias"]].add_(z.abs().sum((0, 2, 3)).mul_(2).to(sums[own["bias"]]))


_HEBBIAN_RULES = {nn.Linear: _hebbian_linear, nn.Conv2d: _hebbian_conv2d}
