"""Ω, θ* and λ in an optimizer's own state dict, so that any checkpoint of the optimizer
(Lightning, HF Trainer, accelerate, torch.distributed.checkpoint) restores the penalty.

``state_dict()["state"][i]`` of a regularised parameter gets ``"mas_omega"`` and
``"mas_init_val"`` (like a momentum buffer: a DTensor sharded like the parameter under FSDP2),
and each ``param_groups[g]`` its ``"reg_lambda"``. Loading takes them out again before torch's
own ``load_state_dict`` sees the state (an optimizer whose state is initialised lazily, as
Adam's, must not find keys of its own there before its first step).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from ._validate import is_sharded

OMEGA, INIT = "mas_omega", "mas_init_val"
Names = Callable[[Mapping[str, Any], int], Sequence[Optional[str]]]


def with_entries(state_dict: Dict[str, Any], param_groups: List[Mapping[str, Any]],
                 names: Names, reg_params: Mapping[str, Mapping[str, Tensor]],
                 reg_lambdas: Sequence[float]) -> Dict[str, Any]:
    """A copy of ``state_dict`` (torch's, of these ``param_groups``) carrying the entries.
    The live optimizer state is not touched: every state dict changed here is a new one."""
    state = dict(state_dict["state"])
    groups = [dict(g) for g in state_dict["param_groups"]]
    for i, (group, saved) in enumerate(zip(param_groups, groups)):
        saved["reg_lambda"] = reg_lambdas[i]
        for name, index in zip(names(group, i), saved["params"]):
            entry = reg_params.get(name) if name is not None else None
            if entry is not None:
                state[index] = {**state.get(index, {}), OMEGA: entry["omega"],
                                INIT: entry["init_val"]}
    return {**state_dict, "state": state, "param_groups": groups}


def take_entries(state_dict: Mapping[str, Any], param_groups: List[Mapping[str, Any]],
                 names: Names) -> Tuple[Dict[str, Any], Optional[Dict[str, Dict[str, Tensor]]]]:
    """(``state_dict`` without the entries, the reg_params they make, keyed by this optimizer's
    names and copied to each parameter's device and dtype; None where it carries none)."""
    state = state_dict.get("state")
    saved_groups = state_dict.get("param_groups")
    if not isinstance(state, Mapping) or not isinstance(saved_groups, list):
        return dict(state_dict), None  # torch's load_state_dict says what is wrong
    found: Dict[str, Dict[str, Tensor]] = {}
    rest = dict(state)
    for i, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        for name, p, index in zip(names(group, i), group["params"], saved.get("params", ())):
            st = state.get(index)
            if not isinstance(st, Mapping) or OMEGA not in st:
                continue
            kept = {k: v for k, v in st.items() if k not in (OMEGA, INIT)}
            if kept:
                rest[index] = kept
            else:  # no state of the optimizer's own: it initialises it at its first step
                del rest[index]
            if name is not None:
                found[name] = {"omega": _like(st[OMEGA], p), "init_val": _like(st[INIT], p)}
    if not found and not any(isinstance(st, Mapping) and OMEGA in st for st in state.values()):
        return dict(state_dict), None
    return {**state_dict, "state": rest}, found


def _like(t: Tensor, p: Tensor) -> Tensor:
    # A copy: the loaded state dict may still be another optimizer's live tensors.
    if is_sharded(t):
        return t.detach().clone()
    return t.detach().to(device=p.device, dtype=p.dtype, copy=True)


def has_loaded_entries(optimizer) -> bool:
    """Whether a state dict loaded into ``optimizer`` without the penalty attached left
    Ω/θ* in its state (what :func:`pop_loaded_entries` would take)."""
    return any(isinstance(st, Mapping) and OMEGA in st for st in optimizer.state.values())


def pop_loaded_entries(optimizer, names: Names) -> Optional[Dict[str, Dict[str, Tensor]]]:
    """Take out of ``optimizer.state`` the entries a state dict loaded there before the penalty
    was attached (HF Trainer loads the optimizer before its callbacks run): the reg_params they
    make, or None where there are none. A parameter left with no state of its own gets none, so
    that the optimizer initialises it at its first step."""
    found: Dict[str, Dict[str, Tensor]] = {}
    seen = False
    for i, group in enumerate(optimizer.param_groups):
        for name, p in zip(names(group, i), group["params"]):
            st = optimizer.state.get(p)
            if not st or OMEGA not in st:
                continue
            seen = True
            omega, init = st.pop(OMEGA), st.pop(INIT, None)
            if not st:
                del optimizer.state[p]
            if name is not None and init is not None:
                found[name] = {"omega": omega, "init_val": init}
    return found if seen else None
