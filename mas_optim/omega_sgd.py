r"""OmegaSgd: the optimizer that drives MAS's importance pass.

After a task, MAS measures how sensitive the learnt function F is to each parameter (paper Eq. 2):

.. math::
    \Omega_{ij} = \frac{1}{N} \sum_{k=1}^{N} \left| g_{ij}(x_k) \right|, \qquad
    g_{ij}(x_k) = \frac{\partial \lVert F(x_k; \theta) \rVert_2^2}{\partial \theta_{ij}} .

In the original code's design an optimizer holds this running mean: backpropagate
‖F(x)‖², call ``step()``, repeat. :func:`mas_optim.compute_omega` gives the same numbers from
whole batches much faster; OmegaSgd remains for loops written in the original style.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor


class OmegaSgd(torch.optim.SGD):
    r"""Accumulates Ω as a running mean of gradient magnitudes; never changes a parameter.

    Each ``step(num_samples=n)`` treats the current ``.grad`` as the gradient of
    :math:`\sum_{k \in batch} \lVert F(x_k) \rVert_2^2` over ``n`` samples and updates

    .. math::
        \Omega \leftarrow \frac{N\,\Omega + |g|}{N + n}, \qquad N \leftarrow N + n .

    With one sample per step (n = 1) this is exactly paper Eq. 2; with whole batches it is the
    batch formula (``compute_omega(..., per_sample=False)``). A parameter whose ``.grad`` is
    ``None`` counts as a zero gradient for those samples.

    Args:
        params: named parameters (``model.named_parameters()``) or param groups of them.
    """

    def __init__(self, params) -> None:
        super().__init__(params, lr=0.0)
        for group in self.param_groups:
            if "param_names" not in group:
                raise ValueError("OmegaSgd needs parameter names: pass model.named_parameters()")

    @torch.no_grad()
    def step(self, closure=None, num_samples: int = 1):  # type: ignore[override]
        """Fold the current gradients' magnitudes into Ω.

        Args:
            closure: optional callable that recomputes the gradients and returns the loss.
            num_samples: how many samples the current gradient sums over (default 1).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"Invalid num_samples value: {num_samples}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "omega" not in state:
                    state["omega"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["num_samples"] = 0
                seen = state["num_samples"]
                total = seen + num_samples
                omega = state["omega"].mul_(seen / total)
                if p.grad is not None:
                    omega.add_(p.grad.abs(), alpha=1.0 / total)  # Eq. 2, as a running mean
                state["num_samples"] = total
        return loss

    def omega(self) -> Dict[str, Tensor]:
        """Ω so far, by parameter name (zeros for a parameter that has seen no step)."""
        return {
            name: self.state[p]["omega"].clone() if "omega" in self.state.get(p, {})
            else torch.zeros_like(p)
            for group in self.param_groups
            for name, p in zip(group["param_names"], group["params"])
        }
