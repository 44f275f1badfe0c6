"""Checks shared by LocalSgd, the any-optimizer penalty and reg_params: one place, one wording.

A reg_params entry reaches the penalty by three doors (the constructor, assignment to
``reg_params``, ``step(reg_params)``) and can change behind them (a parameter replaced by a
larger one, a tensor swapped into the dict); every door and every change goes through
:func:`check_entry`, so a bad value is refused with the parameter's name instead of turning the
weights into NaN or being broadcast.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed: no parameter can be sharded
    DTensor = None  # type: ignore[assignment,misc]

_KEYS = ("omega", "init_val")


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or ``t`` itself.

    The penalty 2λΩ(θ − θ*) is elementwise, so with θ, Ω and θ* sharded alike each rank updates
    its own shard and nothing is communicated."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def is_sharded(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def as_reg_lambda(value: Any) -> float:
    """λ as a float: any finite real scalar ≥ 0 (Python or numpy number, 0-dim real tensor).

    Strings are refused rather than parsed: like ``lr``, λ is a number, and a string here means
    a config value that was never converted (``float(cfg["reg_lambda"])`` where it is read)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() != 0 or value.is_complex():
            raise ValueError(f"Invalid reg_lambda value: a tensor of shape {tuple(value.shape)} "
                             "(a 0-dim real tensor is accepted)")
        value = value.item()
    if isinstance(value, str):
        raise ValueError(f"Invalid reg_lambda value: {value!r} is a string; convert it with "
                         "float() where it is read")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid reg_lambda value: {value!r} (a real number >= 0 is needed)")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Invalid reg_lambda value: {value}")
    return value


def check_structure(reg_params: Any) -> None:
    """reg_params is ``{str: {"omega": Tensor, "init_val": Tensor}}``; otherwise a TypeError
    naming the offending key (with the ``reg_lambda=`` hint for a stray λ such as the original
    code's ``reg_params['lambda']``)."""
    if not isinstance(reg_params, Mapping):
        raise TypeError(f"reg_params must be a dict keyed by parameter name, got "
                        f"{type(reg_params).__name__}")
    for name, entry in reg_params.items():
        if not isinstance(name, str):
            raise TypeError(f"reg_params must be keyed by parameter names (str), got a key of "
                            f"type {type(name).__name__}")
        if not isinstance(entry, Mapping):
            hint = ""
            if isinstance(entry, (numbers.Number, Tensor)) or "lambda" in name.lower():
                hint = ("; λ is not part of reg_params: pass it to the optimizer as "
                        "reg_lambda=")
            raise TypeError(f"reg_params[{name!r}] is a {type(entry).__name__}, not "
                            f"{{'omega': Ω, 'init_val': θ*}}{hint}")
        for key in _KEYS:
            if not isinstance(entry.get(key), Tensor):
                raise TypeError(f"reg_params[{name!r}][{key!r}] must be a tensor, got "
                                f"{type(entry.get(key)).__name__}")


def check_entry(name: str, entry: Mapping[str, Tensor], p: Tensor) -> None:
    """Ω and θ* fit parameter ``p`` (shape, dtype, device, sharding), are finite, and Ω ≥ 0."""
    for key in _KEYS:
        t = entry[key]
        if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            if t.shape != p.shape:
                hint = (" (the parameter changed shape, e.g. a growing head: re-create its "
                        "entry or leave it out of reg_params)")
            elif t.device != p.device:
                hint = " (load_reg_params(path, model) moves entries to the model's device)"
            else:
                hint = f" (convert the entry with .to({p.dtype}))"
            raise ValueError(
                f"reg_params[{name!r}][{key!r}] is {tuple(t.shape)} {t.dtype} on {t.device}, "
                f"the parameter is {tuple(p.shape)} {p.dtype} on {p.device}{hint}")
        if is_sharded(t) != is_sharded(p) or (
                is_sharded(p) and (t.placements != p.placements or t.device_mesh != p.device_mesh)):
            raise ValueError(
                f"reg_params[{name!r}][{key!r}] is not sharded like its parameter: build "
                "reg_params from the sharded model or use mas_optim.sharded.shard_reg_params_like")
        values = local(t)
        if not torch.isfinite(values).all():
            raise ValueError(f"reg_params[{name!r}][{key!r}] holds NaN or Inf")
    if (local(entry["omega"]) < 0).any():
        raise ValueError(f"reg_params[{name!r}]['omega'] holds negative values: importance "
                         "is a magnitude, Ω >= 0")


def check_reg_params(reg_params: Any, named: Mapping[str, Tensor]) -> None:
    """Structure of every entry, values of the entries whose name is in ``named``; and at least
    one name must match (keys that match nothing mean reg_params of another module)."""
    check_structure(reg_params)
    for name, entry in reg_params.items():
        p = named.get(name)
        if p is not None:
            check_entry(name, entry, p)
    if reg_params and not any(name in named for name in reg_params):
        if not named:
            raise ValueError("reg_params given, but the optimizer's parameters have no names: "
                             "pass model.named_parameters(), names key reg_params")
        raise ValueError("no name in reg_params matches a parameter of this optimizer: "
                         + explain_name_mismatch(list(reg_params), list(named)))


def group_names(group: Mapping[str, Any], index: int) -> List[Optional[str]]:
    """The name of each parameter of a param group, ``None`` where it has none.

    Parameters appended to ``group["params"]`` without a name (Avalanche's dynamic optimizer,
    a hand-written ``extend``) come after the named ones and get ``None``: no reg_params entry,
    torch's SGD update."""
    params = group["params"]
    names = group.get("param_names")
    if names is None:
        return [None] * len(params)
    if len(names) > len(params):
        raise RuntimeError(
            f"param group {index} has {len(names)} param_names for {len(params)} params: a "
            "parameter was removed from group['params'] without its name; remove both, so "
            "that names still match their parameters")
    return list(names) + [None] * (len(params) - len(names))


class CheckedEntries:
    """The reg_params entry of each parameter, checked with :func:`check_entry` when first seen
    and again whenever it may have changed: another entry or tensor, an in-place change
    (a tensor's version), a parameter of another shape. Also keeps max Ω, for the stability
    check of the explicit step."""

    def __init__(self) -> None:
        self._seen: Dict[Tensor, tuple] = {}

    def get(self, reg_params: Mapping[str, Mapping[str, Tensor]], name: Optional[str],
            p: Tensor) -> Optional[Tuple[Tensor, Tensor, float]]:
        """(Ω, θ*, max Ω) of ``p``'s entry, or None where it has none."""
        entry = reg_params.get(name) if name is not None else None
        if entry is None:
            return None
        omega, init = entry["omega"], entry["init_val"]
        seen = self._seen.get(p)
        key = (omega._version, init._version, p.shape)
        if seen is None or seen[0] is not omega or seen[1] is not init or seen[2] != key:
            check_entry(name, entry, p)  # type: ignore[arg-type]
            top = float(local(omega).max()) if omega.numel() else 0.0
            seen = self._seen[p] = (omega, init, key, top)
        return omega, init, seen[3]

    def keep_only(self, params: Iterable[Tensor]) -> None:
        """Forget parameters that left the optimizer."""
        live = set(params)
        if len(self._seen) > len(live):
            self._seen = {p: v for p, v in self._seen.items() if p in live}


def unwrap_optimizer(optimizer: Any, who: str) -> torch.optim.Optimizer:
    """The torch optimizer inside the wrappers training frameworks hand over: accelerate's
    ``AcceleratedOptimizer`` (``.optimizer``; itself an Optimizer subclass without the state of
    one), Lightning's ``LightningOptimizer`` (``._optimizer``). Anything else that is not a
    ``torch.optim.Optimizer``: a TypeError."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{who} needs a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}: pass the torch optimizer it wraps")
    return optimizer


def explain_name_mismatch(expected: Iterable[str], found: Iterable[str]) -> str:
    """One sentence on why parameter names ``expected`` (reg_params' keys) are not among
    ``found`` (a model's or optimizer's names), for an error message:

    * names that differ only by one dotted part, the same swap for all: a PEFT adapter name
      (``...lora_A.default.weight`` vs ``...lora_A.task_b.weight``);
    * names that differ by a prefix: a wrapper (``module.`` of DDP, ``_orig_mod.`` of
      ``torch.compile``, ``base_model.model.`` of PEFT);
    * otherwise: an example of each side.
    """
    expected = [n for n in expected]
    found_set = set(found)
    found = sorted(found_set)
    missing = [n for n in expected if n not in found_set]
    if not missing:
        return "every name matches"
    if not found:
        return "the model has no named parameters"
    swaps: Dict[tuple, str] = {}  # (position, expected part, found part) -> an example
    by_shape: Dict[tuple, list] = {}
    for name in found:
        parts = name.split(".")
        for i in range(len(parts)):
            by_shape.setdefault((len(parts), i, tuple(parts[:i] + parts[i + 1:])), []).append(
                parts[i])
    for name in missing:
        parts = name.split(".")
        for i in range(len(parts)):
            for other in by_shape.get((len(parts), i, tuple(parts[:i] + parts[i + 1:])), ()):
                swaps.setdefault((parts[i], other), name)
    if len(swaps) == 1 and not any(part.isdigit() for part in next(iter(swaps))):
        (old, new), example = next(iter(swaps.items()))
        return (f"the names differ only by adapter name: {old!r} in reg_params, {new!r} in the "
                f"parameters (e.g. {example!r} vs "
                f"{'.'.join(new if p == old else p for p in example.split('.'))!r})")
    for a, b, which in ((missing, found, "reg_params'"), (found, missing, "the parameters'")):
        for extra in _prefixes(a[0], b):
            if all(n[len(extra):] in set(b) for n in a if n.startswith(extra)):
                return (f"the names differ by a prefix: {which} carry {extra!r} (a wrapper: "
                        f"DDP's 'module.', torch.compile's '_orig_mod.'); build reg_params from "
                        f"the module the optimizer holds")
    return (f"no name matches: e.g. {missing[0]!r} vs {found[0]!r}; build reg_params from the "
            f"module whose named_parameters() the optimizer holds")


def _prefixes(name: str, others: Iterable[str]) -> list:
    """Dotted prefixes of ``name`` whose removal gives one of ``others``."""
    others = set(others)
    parts = name.split(".")
    return [".".join(parts[:i]) + "." for i in range(1, len(parts))
            if ".".join(parts[i:]) in others]
