"""Paper Eq. 2 literally, for the compute_omega tests: a float64 copy of the model, eval mode,
one forward and backward per sample (or per batch, for the batch formula)."""

import copy

import torch
from torch.utils._pytree import tree_leaves, tree_map


def default_forward(model, batch):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch[0])


def default_output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if isinstance(out, dict) else out.logits


def _rows(batch, n, rows):
    index = torch.tensor(rows)
    return tree_map(lambda t: t.index_select(0, index)
                    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else t,
                    batch)


def reference_omega(model, batches, per_sample=True, forward_fn=default_forward,
                    output_fn=default_output, dtype=torch.float64):
    """(1/N) Σ_k |∂‖F(x_k)‖²/∂θ| with batch size 1 (per_sample=False: the batch formula,
    (1/N) Σ_b |∂ Σ_{k∈b} ‖F(x_k)‖²/∂θ|), computed in ``dtype`` on a copy of ``model``."""
    ref = copy.deepcopy(model).to(dtype).eval()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    for batch in batches:
        batch = tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor)
                         and t.is_floating_point() else t, batch)
        n = next(t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)).shape[0]
        for rows in ([[k] for k in range(n)] if per_sample else [list(range(n))]):
            out = output_fn(forward_fn(ref, _rows(batch, n, rows)))
            loss = sum(t.square().sum() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for name, g in zip(params, grads):
                if g is not None:
                    acc[name] += g.abs().double()
        count += n
    return {n: a / count for n, a in acc.items()}


def max_relative_error(got, want):
    """max over parameters of max|got − want| / max|want| (the reference must not be all zero)."""
    assert set(got) == set(want), set(got) ^ set(want)
    worst = 0.0
    for n in want:
        scale = want[n].abs().max().item()
        assert scale > 0, f"{n}: reference is all zero, the test would prove nothing"
        err = (got[n].double() - want[n]).abs().max().item() / scale
        worst = max(worst, err)
    return worst


def assert_close(got, want, rel=1e-4):
    for n in want:
        scale = want[n].abs().max().item()
        assert scale > 0, f"{n}: reference is all zero, the test would prove nothing"
        err = (got[n].double() - want[n].double()).abs().max().item() / scale
        assert err <= rel, f"{n}: relative error {err:.2e}"
    assert set(got) == set(want), set(got) ^ set(want)
