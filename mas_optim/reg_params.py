"""reg_params: what MAS remembers between tasks, keyed by parameter name.

For every regularised parameter θ (by its name in ``model.named_parameters()``)::

    reg_params[name] = {"omega": Ω, "init_val": θ*}

Ω is the accumulated importance (paper Eq. 2 and Eq. 4) and θ* the value the parameter had when
the last task ended; the penalty is λ Σ Ω (θ − θ*)² (paper Eq. 3).

Keys are names, not tensor objects: a name survives pickling and a reload into a fresh model,
a tensor's identity does not (a dict keyed by tensors finds no parameter after a reload, so the
penalty would be silently off).

File format (``reg_params.pickle``): a pickle of builtins only (dict, str, int, list, bytes), each
tensor stored as ``{"dtype": str, "shape": [int], "data": bytes}`` in little-endian order.
Because the format needs no class at all, the loader's unpickler refuses *every* global: a
crafted file cannot construct an object, let alone run code.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import pickle
import sys
from typing import Callable, Dict, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ._validate import check_structure, explain_name_mismatch, is_sharded
from .atomic import PathLike, atomic_write

RegParams = Dict[str, Dict[str, torch.Tensor]]

FORMAT_NAME = "mas_optim.reg_params"
FORMAT_VERSION = 1
_KEYS = ("omega", "init_val")
_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


class RegParamsError(ValueError):
    """A reg_params file (or object) is missing, damaged, hostile or does not fit the model."""


def init_reg_params(model: nn.Module,
                    freeze_layers: Union[str, Iterable[str]] = ()) -> RegParams:
    """Fresh reg_params for ``model``: Ω = 0 and θ* = the current values.

    Args:
        model: the network whose parameters will be regularised.
        freeze_layers: parameter names (as in ``model.named_parameters()``) to leave out, such as
            frozen layers or a task head; a single string is one name. A name that matches no
            parameter is an error, so a typo cannot silently regularise a layer you meant to
            exclude.

    Returns:
        ``{name: {"omega": zeros_like(p), "init_val": p.detach().clone()}}`` for every
        parameter with ``requires_grad`` whose name is not in ``freeze_layers``. On a model
        sharded by FSDP2 ``fully_shard`` the entries are DTensors placed like the parameters.
    """
    named = dict(model.named_parameters())
    excluded = {freeze_layers} if isinstance(freeze_layers, str) else set(freeze_layers)
    unknown = sorted(excluded - set(named))
    if unknown:
        raise ValueError(f"freeze_layers names no parameter of the model: {unknown}")
    return {
        name: {"omega": torch.zeros_like(p, memory_format=torch.contiguous_format),
               "init_val": p.detach().clone(memory_format=torch.contiguous_format)}
        for name, p in named.items()
        if p.requires_grad and name not in excluded
    }


def consolidate_reg_params(
    reg_params: RegParams,
    model: nn.Module,
    omega: Mapping[str, torch.Tensor],
    accumulate: Union[str, float] = "sum",
) -> RegParams:
    """Fold a finished task's importance into reg_params and anchor θ* at the current values.

    Paper Sec. 4 accumulates importance over tasks, Ω ← Ω_old + Ω_new (``accumulate="sum"``, as
    the original code does). With a float ``alpha`` the update is the moving average
    Ω ← α Ω_old + (1 − α) Ω_new used by FACIL and Avalanche.

    The tensors are updated **in place** and the same dict is returned, so an optimizer that
    holds ``reg_params`` sees the new values at once.

    Args:
        reg_params: from :func:`init_reg_params` or :func:`load_reg_params`.
        model: its named parameters give the new θ*.
        omega: importance of the task just learnt, e.g. from :func:`compute_omega`; must have an
            entry for every name in ``reg_params`` whose parameter is trainable (extra names,
            such as a head's, are ignored). An entry of a frozen parameter that ``omega`` lacks
            (a LoRA adapter no longer trained, which :func:`compute_omega` skips) is kept as it
            is: the parameter did not learn this task, and it has not moved.
        accumulate: ``"sum"`` or a float alpha in [0, 1] (see :func:`parse_accumulate`).
    """
    alpha = parse_accumulate(accumulate)
    named = dict(model.named_parameters())
    unknown = [name for name in reg_params if name not in named]
    if unknown:
        raise KeyError(f"reg_params has {unknown[0]!r}, which the model does not have; "
                       + explain_name_mismatch(unknown, named))
    for name, entry in reg_params.items():
        if name not in omega:
            if not named[name].requires_grad:
                continue  # frozen since: keeps its importance and anchor
            raise KeyError(f"omega has no entry for regularised parameter {name!r}")
        new = omega[name].detach().to(entry["omega"])
        if new.shape != entry["omega"].shape:
            raise ValueError(f"omega[{name!r}] has shape {tuple(new.shape)}, "
                             f"reg_params has {tuple(entry['omega'].shape)}")
        if not torch.isfinite(new).all():
            raise ValueError(f"omega[{name!r}] holds NaN or Inf")
        if alpha == "sum":
            entry["omega"].add_(new)  # Eq. 4 summed over tasks
        else:
            entry["omega"].mul_(alpha).add_(new, alpha=1.0 - alpha)
        entry["init_val"].copy_(named[name].detach())
    return reg_params


def parse_accumulate(value: Union[str, float]) -> Union[str, float]:
    """How Ω of a new task is folded in: ``"sum"`` or α in [0, 1], from code, a command line or
    a config file (``"0.5"`` parses to 0.5).

    Raises:
        ValueError: one line naming the value, for anything else (``True`` included).
    """
    message = f"accumulate must be 'sum' or a number in [0, 1], got {value!r}"
    if isinstance(value, str):
        if value.strip() == "sum":
            return "sum"
        try:
            alpha = float(value)
        except ValueError:
            raise ValueError(message) from None
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        alpha = float(value)
    else:
        raise ValueError(message)
    if not 0.0 <= alpha <= 1.0:  # also refuses NaN
        raise ValueError(message)
    return alpha


# ----------------------------------------------------------------------- sharded (FSDP2)

def full_reg_params(reg_params: RegParams) -> RegParams:
    """Full, plain CPU tensors for the ``DTensor`` entries of ``reg_params``; others as they are.

    Collective: every rank must call it, with the same names in the same order (as
    :func:`mas_optim.init_reg_params` builds them on every rank). Each ``DTensor`` is gathered
    one at a time, so beyond the result only one full tensor is in flight. ``reg_params`` is not
    modified; a new dict is returned.
    """
    return {
        name: {key: t.full_tensor().cpu() if is_sharded(t) else t for key, t in entry.items()}
        for name, entry in reg_params.items()
    }


def shard_reg_params_like(reg_params: RegParams, model: nn.Module) -> RegParams:
    """This rank's slices of full reg_params, placed like ``model``'s sharded parameters.

    For every name whose parameter in ``model`` is a ``DTensor``, the entry's full tensors
    become ``DTensor``\\ s on that parameter's device mesh with its placements (each rank keeps
    its slice of its own copy: no communication, so every rank must hold the same full tensors,
    as every rank that loaded the same file does). Other entries are returned unchanged.
    ``reg_params`` is not modified; a new dict is returned.

    Raises:
        ValueError: a full tensor's shape differs from its parameter's (global) shape.
    """
    # imported here: only a model with DTensor parameters needs torch.distributed.tensor
    from torch.distributed.tensor import distribute_tensor

    named = dict(model.named_parameters())
    out: RegParams = {}
    for name, entry in reg_params.items():
        p = named.get(name)
        if not is_sharded(p):
            out[name] = entry
            continue
        sharded = {}
        for key, t in entry.items():
            if is_sharded(t):
                if t.device_mesh != p.device_mesh or t.placements != p.placements:
                    raise ValueError(f"reg_params[{name!r}][{key!r}] is already sharded, "
                                     "but not like its parameter; pass full tensors")
                sharded[key] = t
                continue
            if t.shape != p.shape:
                raise ValueError(f"reg_params[{name!r}][{key!r}] has shape {tuple(t.shape)}, "
                                 f"the parameter's (global) shape is {tuple(p.shape)}")
            # src_data_rank=None: every rank slices its own full copy, nothing is sent.
            sharded[key] = distribute_tensor(t.detach().to(p.device), p.device_mesh,
                                             p.placements, src_data_rank=None)
        out[name] = sharded
    return out


# ----------------------------------------------------------------------------- persistence

def save_reg_params(reg_params: RegParams, path: PathLike, *,
                    before_replace: Optional[Callable[[], None]] = None) -> None:
    """Pickle ``reg_params`` to ``path`` atomically (see :func:`mas_optim.atomic_write`, which
    also explains ``before_replace``).

    Sharded entries (DTensors, from a model under FSDP2 ``fully_shard``) are gathered to full
    tensors first, so the file does not depend on the number of ranks: then every rank must call
    this, rank 0 writes, and all ranks return once the file is in place.
    """
    check_structure(reg_params)
    if any(is_sharded(t) for entry in reg_params.values() for t in entry.values()):
        full = full_reg_params(reg_params)
        # Rank 0 writes and tells every rank how it went: a failed write is then an error on
        # every rank, not rank 0's error and a hang of the others in a barrier.
        error = None
        if torch.distributed.get_rank() == 0:
            try:
                save_reg_params(full, path, before_replace=before_replace)
            except Exception as e:
                error = e
        outcome = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(outcome, src=0)
        if error is not None:
            raise error
        if outcome[0] is not None:
            raise OSError(f"{os.fspath(path)}: rank 0 could not write it ({outcome[0]})")
        return
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "byteorder": "little",
        "params": {name: {key: _encode_tensor(entry[key]) for key in _KEYS}
                   for name, entry in reg_params.items()},
    }
    atomic_write(path, pickle.dumps(payload, protocol=4), before_replace=before_replace)


def load_reg_params(path: PathLike, model: Optional[nn.Module] = None) -> RegParams:
    """Load reg_params written by :func:`save_reg_params`, executing nothing.

    Args:
        path: the ``reg_params.pickle`` file.
        model: when given, every name must be a parameter of ``model`` with the same shape
            (trainable or frozen: PEFT loads an adapter frozen), and the tensors are moved to
            that parameter's device; for parameters sharded
            by FSDP2 ``fully_shard`` each rank gets its own shard (DTensors placed alike).

    Raises:
        RegParamsError: the file is missing, unreadable, empty, truncated, not a reg_params
            file, hostile (asks for any class or function), holds NaN/Inf, or does not fit
            ``model``. The message names the file and the problem.
    """
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise RegParamsError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise RegParamsError(f"{where}: is a directory, not a reg_params file") from None
    except OSError as e:
        raise RegParamsError(f"{where}: cannot read: {e.strerror or e}") from None
    if not raw:
        raise RegParamsError(f"{where}: empty file")
    try:
        payload = _NoGlobalsUnpickler(io.BytesIO(raw)).load()
    except RegParamsError as e:
        raise RegParamsError(f"{where}: {e}") from None
    except Exception as e:  # pickle raises many types on garbage: EOFError, ValueError, ...
        raise RegParamsError(
            f"{where}: damaged or truncated, not a readable reg_params pickle "
            f"({type(e).__name__}: {e})") from None

    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise RegParamsError(f"{where}: not a mas_optim reg_params file")
    if payload.get("version") != FORMAT_VERSION:
        raise RegParamsError(f"{where}: unsupported reg_params format version "
                             f"{payload.get('version')!r} (this mas_optim reads {FORMAT_VERSION})")
    if payload.get("byteorder") != "little":
        raise RegParamsError(f"{where}: unsupported byte order {payload.get('byteorder')!r}")
    params = payload.get("params")
    if not isinstance(params, dict):
        raise RegParamsError(f"{where}: 'params' is not a dict")

    reg_params: RegParams = {}
    for name, entry in params.items():
        if not isinstance(name, str) or not isinstance(entry, dict) or set(entry) != set(_KEYS):
            raise RegParamsError(f"{where}: entry {name!r} is not {{'omega', 'init_val'}}")
        reg_params[name] = {key: _decode_tensor(entry[key], where, f"{name}.{key}")
                            for key in _KEYS}
        if reg_params[name]["omega"].shape != reg_params[name]["init_val"].shape:
            raise RegParamsError(f"{where}: {name}: omega and init_val differ in shape")
    if model is not None:
        _fit_to_model(reg_params, model, where)
        if any(is_sharded(p) for p in model.parameters()):
            return shard_reg_params_like(reg_params, model)
    return reg_params


class _NoGlobalsUnpickler(pickle.Unpickler):
    # The format holds builtins only, so no global is ever legitimate.
    def find_class(self, module: str, name: str):  # noqa: D401
        raise RegParamsError(
            f"refused: the file asks to load '{module}.{name}'. A reg_params file holds no "
            "classes or code; this one was crafted or written by another program")

    def persistent_load(self, pid):
        raise RegParamsError("refused: the file uses persistent ids, which reg_params never do")


def _encode_tensor(t: torch.Tensor) -> dict:
    t = t.detach().to("cpu").contiguous()
    dtype = str(t.dtype).replace("torch.", "")
    if dtype not in _DTYPES:
        raise TypeError(f"reg_params tensors must be floating point, got {t.dtype}")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise RuntimeError("saving reg_params on a big-endian machine is not supported")
    return {"dtype": dtype, "shape": list(t.shape), "data": data}


def _decode_tensor(blob, where: str, what: str) -> torch.Tensor:
    if not isinstance(blob, dict) or set(blob) != {"dtype", "shape", "data"}:
        raise RegParamsError(f"{where}: {what} is not an encoded tensor")
    dtype = _DTYPES.get(blob["dtype"]) if isinstance(blob["dtype"], str) else None
    shape, data = blob["shape"], blob["data"]
    if dtype is None:
        raise RegParamsError(f"{where}: {what} has unsupported dtype {blob['dtype']!r}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise RegParamsError(f"{where}: {what} has an invalid shape {shape!r}")
    if not isinstance(data, bytes):
        raise RegParamsError(f"{where}: {what} has no byte data")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != math.prod(shape) * itemsize:
        raise RegParamsError(f"{where}: {what} holds {len(data)} bytes, shape {shape} needs "
                             f"{math.prod(shape) * itemsize} (damaged file)")
    t = (torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype))
    t = t.reshape(shape)
    if not torch.isfinite(t).all():
        raise RegParamsError(f"{where}: {what} holds NaN or Inf")
    return t


def _fit_to_model(reg_params: RegParams, model: nn.Module, where: str) -> None:
    named = dict(model.named_parameters())
    missing = sorted(set(reg_params) - set(named))
    if missing:
        raise RegParamsError(f"{where}: has parameters the model does not have: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                             + explain_name_mismatch(missing, named))
    for name, entry in reg_params.items():
        p = named[name]
        if entry["omega"].shape != p.shape:
            raise RegParamsError(f"{where}: {name} has shape {tuple(entry['omega'].shape)}, "
                                 f"the model's has {tuple(p.shape)}")
        for key in _KEYS:
            entry[key] = entry[key].to(device=p.device)
