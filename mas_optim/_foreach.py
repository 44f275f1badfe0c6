"""The multi-tensor MAS penalty: its arithmetic, and a param group's lists kept between steps.

Gathering what torch's ``_foreach_*`` kernels take (each parameter's reg_params entry, checked,
its Ω and θ* or the cached 2λΩ and 2λΩθ*) costs the host more than launching the kernels on a
GPU, where the host is what a small model's step waits for. A plan keeps those lists from the
last full step; each step re-checks, parameter by parameter, only what a training loop can change
between steps. Anything else, and the caller runs its full step, which checks everything and
plans again. Names are taken as the plan found them: the same parameter object keeps its name.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

# (2λΩ, 2λΩθ*, None) per parameter where all are cached, else (Ω, θ*, 2λ): local tensors.
ForeachPenalty = Tuple[List[Tensor], List[Tensor], Optional[float]]


def penalty_lists(terms: Sequence[Any]) -> ForeachPenalty:
    """The lists :func:`add_penalty_` takes, from LocalSgd's ``_Terms`` of each parameter."""
    if all(t.slope is not None for t in terms):
        return [t.slope for t in terms], [t.offset for t in terms], None
    return [t._omega for t in terms], [t._init for t in terms], terms[0].coef


def add_penalty_(out: List[Tensor], ps: List[Tensor], penalty: ForeachPenalty,
                 scale: float) -> None:
    """out += scale · 2λΩ(θ − θ*) (Eq. 3): two launches per group, cached or not."""
    a, c, coef = penalty
    if coef is None:  # out += scale·(2λΩ·θ − 2λΩθ*)
        torch._foreach_addcmul_(out, a, ps, value=scale)
        torch._foreach_sub_(out, c, alpha=scale)
    else:
        torch._foreach_addcmul_(out, a, torch._foreach_sub(ps, c), value=coef * scale)


class ForeachPlan:
    """``items``: one per parameter of the group, in order: (θ, name, entry, Ω, θ*, Ω version,
    θ* version, shape, optimizer state, momentum buffer, plain); entry None for a parameter the
    plan does not penalise, ``plain`` True for one of those that the plan steps without the
    penalty (LocalSgd's parameters without an entry). ``ps``, ``bs`` and ``penalty``: the lists
    of the penalised parameters; ``plain_ps``, ``plain_bs``: of the plain ones.

    ``others_step_alone``: a parameter without a reg_params entry is stepped by the optimizer
    itself and may have a gradient (add_mas_penalty's hook); otherwise (LocalSgd) the plan
    holds only while the parameters it steps have gradients and the others have none."""

    __slots__ = ("params", "switches", "items", "ps", "bs", "penalty", "plain_ps", "plain_bs",
                 "others_step_alone")

    def __init__(self, params: List[Tensor], switches: tuple, others_step_alone: bool) -> None:
        self.params, self.switches, self.others_step_alone = params, switches, others_step_alone
        self.items: list = []
        self.ps: List[Tensor] = []
        self.bs: List[Tensor] = []
        self.plain_ps: List[Tensor] = []
        self.plain_bs: List[Optional[Tensor]] = []
        self.penalty: ForeachPenalty = ([], [], None)

    @classmethod
    def build(cls, params: List[Tensor], names: Sequence[Optional[str]], switches: tuple,
              stepped: Sequence[Tuple[Tensor, str, Mapping[str, Tensor]]],
              penalty: ForeachPenalty, state: Optional[Callable[[Tensor], Any]] = None,
              momentum: bool = False, plain: Sequence[Tensor] = (),
              others_step_alone: bool = False) -> "ForeachPlan":
        """``names``: the group's parameter names (None: unnamed); ``stepped``: (θ, name,
        entry) of the parameters the full step just penalised, ``plain``: those it stepped
        without the penalty; ``state(θ)``: the optimizer's state dict of θ, where it is to be
        kept (LocalSgd's momentum buffers, which the step must have made already)."""
        plan = cls(params, switches, others_step_alone)
        plan.penalty = penalty
        by_id = {id(p): entry for p, _, entry in stepped}
        plain_ids = {id(p) for p in plain}
        for p, name in zip(params, names):
            entry = by_id.get(id(p))
            is_plain = id(p) in plain_ids
            st = state(p) if state is not None and (entry is not None or is_plain) else None
            buf = st.get("momentum_buffer") if momentum and st is not None else None
            if entry is not None:
                omega, init = entry["omega"], entry["init_val"]
                plan.items.append((p, name, entry, omega, init, omega._version, init._version,
                                   p.shape, st, buf, False))
                plan.ps.append(p)
                if momentum:
                    plan.bs.append(buf)
                continue
            plan.items.append((p, name, None, None, None, 0, 0, None, st, buf, is_plain))
            if is_plain:
                plan.plain_ps.append(p)
                plan.plain_bs.append(buf)
        return plan

    def grads(self, params: List[Tensor], switches: tuple, reg_params: Mapping[str, Any],
              states: Optional[Mapping[Tensor, Any]] = None
              ) -> Optional[Tuple[List[Tensor], List[Tensor]]]:
        """The gradients to step with (penalised, plain), if nothing the plan took has
        changed; else None.

        Checked: the same parameter objects, with gradients where they had them and none
        where the plan would leave them unstepped, the same reg_params entries holding the
        same Ω and θ* at the same versions (no in-place change) and still none for the plain
        ones, the same shapes, the same ``switches`` (what chose the path), and with ``states``
        the same optimizer state and momentum buffer objects."""
        if self.params is not params or len(params) != len(self.items) \
                or self.switches != switches:
            return None
        gs: List[Tensor] = []
        plain_gs: List[Tensor] = []
        for q, (p, name, entry, omega, init, ov, iv, shape, st, buf, plain) in zip(
                params, self.items):
            grad = p.grad
            if q is not p:
                return None
            if entry is not None:
                if (grad is None or grad.is_sparse or reg_params.get(name) is not entry
                        or entry["omega"] is not omega or entry["init_val"] is not init
                        or omega._version != ov or init._version != iv or p.shape != shape):
                    return None
                gs.append(grad)
            elif plain:
                if grad is None or grad.is_sparse or (
                        name is not None and reg_params.get(name) is not None):
                    return None
                plain_gs.append(grad)
            else:  # neither penalised nor stepped when planned
                if grad is not None and not (self.others_step_alone and (
                        name is None or reg_params.get(name) is None)):
                    return None
                continue
            if states is not None and (states.get(p) is not st or (
                    buf is not None and st.get("momentum_buffer") is not buf)):
                return None
        return gs, plain_gs
