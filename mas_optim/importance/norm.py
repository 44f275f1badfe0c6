r"""Normalisation layers: y = γ ⊙ x̂ + β, with x̂ the normalised input (independent of γ, β).

Sample k's gradient is :math:`\partial\gamma = \sum_s g_{ks} \odot \hat x_{ks}` and
:math:`\partial\beta = \sum_s g_{ks}`, summed over the positions s that share one γ entry;
:math:`\Omega_\gamma \mathrel{+}= \sum_k |\partial\gamma_k|`. x̂ is recomputed from the input
exactly as the layer computes it in eval mode:

* ``BatchNorm1d/2d/3d`` with running statistics: x̂ = (x − μ_run) / √(σ²_run + ε), per channel
  (without running statistics BatchNorm normalises by the batch: samples interact, so it has no
  rule and the engine's proof fails);
* ``LayerNorm`` / ``RMSNorm``: over the trailing ``normalized_shape`` of each position;
* ``GroupNorm``: per sample and group of channels;
* ``InstanceNorm1d/2d/3d`` (affine): per sample and channel, or by running statistics when it
  tracks them.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .base import Call, Rule, same_dim_in_and_out


def add_affine_sums(xhat: Tensor, g: Tensor, acc: Dict[str, Tensor]) -> None:
    """xhat, g: (B, S, *P) with P the shape of γ: sum over S per sample, |·|, sum over B."""
    if "weight" in acc:
        acc["weight"].add_((g * xhat).sum(1).abs_().sum(0).to(acc["weight"].dtype))
    if "bias" in acc:
        acc["bias"].add_(g.sum(1).abs_().sum(0).to(acc["bias"].dtype))


def _channels_last(t: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, spatial..., C) -> (B, S, C)."""
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


def _batched_channels(m: nn.Module, call: Call) -> bool:
    return same_dim_in_and_out(call) == 0 and call.input.dim() >= 2


def _batch_norm_check(m: _BatchNorm, call: Call) -> bool:
    return (_batched_channels(m, call) and m.running_mean is not None and not m.training
            and m.affine)


def _batch_norm(m: _BatchNorm, call: Call, acc: Dict[str, Tensor]) -> None:
    a = call.input
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - m.running_mean.view(shape)) * torch.rsqrt(m.running_var.view(shape) + m.eps)
    add_affine_sums(_channels_last(xhat), _channels_last(call.grad), acc)


def _instance_norm_check(m: _InstanceNorm, call: Call) -> bool:
    return (_batched_channels(m, call) and m.affine and not m.training
            and call.input.dim() == m._get_no_batch_dim() + 1)


def _instance_norm(m: _InstanceNorm, call: Call, acc: Dict[str, Tensor]) -> None:
    use_input_stats = not m.track_running_stats
    xhat = F.instance_norm(call.input, None if use_input_stats else m.running_mean,
                           None if use_input_stats else m.running_var, None, None,
                           use_input_stats, 0.0, m.eps)
    add_affine_sums(_channels_last(xhat), _channels_last(call.grad), acc)


def _group_norm(m: nn.GroupNorm, call: Call, acc: Dict[str, Tensor]) -> None:
    xhat = F.group_norm(call.input, m.num_groups, None, None, m.eps)
    add_affine_sums(_channels_last(xhat), _channels_last(call.grad), acc)


def _trailing_check(m: nn.Module, call: Call) -> bool:
    d = same_dim_in_and_out(call)
    return d is not None and d < call.input.dim() - len(m.normalized_shape)


def _positions(t: Tensor, d: int, n: int) -> Tensor:
    """(B, S, *normalized_shape): samples first, every other leading dimension flattened."""
    t = t.movedim(d, 0)
    return t.reshape(t.shape[0], -1, *t.shape[t.dim() - n:])


def _layer_norm(m: nn.LayerNorm, call: Call, acc: Dict[str, Tensor]) -> None:
    d, n = call.only_input(), len(m.normalized_shape)
    xhat = F.layer_norm(call.input, m.normalized_shape, None, None, m.eps)
    add_affine_sums(_positions(xhat, d, n), _positions(call.grad, d, n), acc)


def _rms_norm(m: nn.Module, call: Call, acc: Dict[str, Tensor]) -> None:
    d, n = call.only_input(), len(m.normalized_shape)
    xhat = F.rms_norm(call.input, m.normalized_shape, None, m.eps)
    add_affine_sums(_positions(xhat, d, n), _positions(call.grad, d, n), acc)


RULES = {
    _BatchNorm: Rule(_batch_norm_check, _batch_norm),
    _InstanceNorm: Rule(_instance_norm_check, _instance_norm),
    nn.GroupNorm: Rule(lambda m, call: _batched_channels(m, call) and m.affine, _group_norm),
    nn.LayerNorm: Rule(_trailing_check, _layer_norm),
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    RULES[nn.RMSNorm] = Rule(_trailing_check, _rms_norm)
