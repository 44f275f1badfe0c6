r"""Exact per-sample Ω (paper Eq. 2) from one batched forward and backward.

**What is proven, and how.** A rule reads sample k's part of a module's input and output
gradient from one dimension of the batched tensors. That this dimension holds the samples is
never taken from shapes alone (a sequence-first layer with sequence length == batch size has
the batch size on dim 0 too); it is proven from the data flow:

1. *Probe.* After the batched forward, the network runs again on a probe batch made of a few
   of the same samples in another order (samples 1, 0; sample 1 alone for a batch of two;
   sample 0 twice for a batch of one). For every call of every module, each input and output
   tensor of the batched run is compared with the probe run's: its sample dimension is the one
   dimension whose size is the batch size there and the probe size here (all others equal), and
   the probe's values must be the batched values of the probe samples along it, within
   floating-point tolerance. A tensor equal in both runs is shared by all samples (a mask).
   A module is *proven* when it ran exactly once in both runs, its inputs were not changed in
   place afterwards, every tensor passed the test and every output that needs a gradient has a
   sample dimension. The network's output F must pass too (samples do not interact in eval
   mode), or nothing is proven.
2. *Uses.* While the batched forward runs, a ``TorchFunctionMode`` records, for every trainable
   parameter, which modules were running whenever an operation used it. A parameter is assigned
   to the innermost proven module that was running at *every* use of it: then the parameter's
   per-sample gradient is that module's own vector-Jacobian product at sample k. A parameter
   that the module holding it uses only inside its own ``forward`` gets that module type's rule
   (:mod:`~mas_optim.importance.rules`) if it has one and the rule accepts the layout; any other
   (tied weights, a layer called twice, a parameter used in a parent's ``forward``, a module
   without a rule) gets the module's vector-Jacobian product by ``torch.func`` (only that module
   reruns); with no proven module at all, the whole network per sample by ``torch.func``.
   Two exceptions before that last resort: a parameter whose every use lies in a proven module
   holding it, several such modules none inside another (tied weights), gets the sum of their
   vector-Jacobian products at sample k (*tied*); a parameter of a module whose inputs and
   outputs are the same for every sample, the outputs with a leading dimension of 1 that
   broadcasts over the batch (position embeddings), gets that module's vector-Jacobian product
   with the output gradient of a second forward in which the output is expanded to the batch,
   accepted only if F comes out the same (*expanded*).

**Proven once per signature.** The probe costs a second forward, as much as the rules on a small
network, so within one :func:`~mas_optim.importance.compute_omega` call its result (which
modules are proven, and their sample dimensions) is kept per *signature* of a batch and reused
for every later batch with the same one; a new signature is proven anew. Likewise the
*expanded* check: a batch with the previous batch's signature, once that signature's expanded
forward left F unchanged, expands those outputs in its one forward and takes their gradient
from its one backward. This is tried only for a batch whose own shapes are the previous
batch's; if its signature still turns out to differ, it is run again without. The signature is what
decides the layout for code whose control flow depends on shapes only: the batch's structure
and every tensor's shape, dtype and device (and every non-tensor value in it, by its type where
it compares by identity), every module call with the shapes, dtypes and devices of its inputs
and outputs (and non-tensor values), and
the modules running at each use of each parameter. A batch with another size or sequence
length, a module that did not run or ran twice, a parameter used elsewhere: each is a new
signature (a batch with a value that cannot be hashed is proven on its own). The limit: control
flow that depends on the *values* of the data and changes the layout without changing any of
these (a batch whose samples get reordered, moved to another dimension or made to interact
where an earlier batch with the same signature had them apart on one dimension) is not caught:
the earlier proof is applied to it. For such a model, sum
:func:`~mas_optim.importance.omega_sums` over one-batch loaders (each call proves its batch).
Nothing is kept after the call."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Hashable, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .base import Call
from .functional import Functional
from .rules import rule_for

Forward = Callable[[Any], List[Tensor]]  # batch -> the tensors that make up F(x)


def squared_norm(outputs: List[Tensor]) -> Tensor:
    """Σ_k ‖F(x_k)‖²: in eval mode its gradient for sample k alone is that of ‖F(x_k)‖²."""
    return sum(o.to(torch.promote_types(o.dtype, torch.float32)).square().sum() for o in outputs)


def probe_rows(n: int) -> List[int]:
    return [1, 0] if n >= 3 else [1] if n == 2 else [0, 0]


def select_samples(batch: Any, n: int, rows: List[int]) -> Any:
    """The batch restricted to ``rows``: every tensor whose dim 0 has the batch size."""
    leaves, spec = tree_flatten(batch)
    index = None
    out = []
    for t in leaves:
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n:
            index = torch.tensor(rows, device=t.device) if index is None else index.to(t.device)
            t = t.index_select(0, index)
        out.append(t)
    return tree_unflatten(out, spec)


def sample_dims(batch: Any, n: int) -> List[Optional[int]]:
    return [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else None
            for t in tree_leaves(batch)]


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-7, torch.float32: 1e-3}.get(dtype, 3e-2)


def sample_dim(full: Any, probe: Any, n: int, rows: List[int]) -> Tuple[bool, Optional[int]]:
    """(proven, dim): the dimension of ``full`` holding the n samples, by comparison with the
    probe run's ``probe``; dim None for a leaf that is the same for every sample."""
    if not isinstance(full, Tensor) or not isinstance(probe, Tensor):
        try:
            return bool(full is probe or full == probe), None
        except Exception:
            return False, None
    if full.dim() != probe.dim() or full.is_complex():
        return False, None
    if full.shape == probe.shape:
        return _close(full, probe), None
    changed = [i for i in range(full.dim()) if full.shape[i] != probe.shape[i]]
    if len(changed) != 1 or full.shape[changed[0]] != n or probe.shape[changed[0]] != len(rows):
        return False, None
    d = changed[0]
    expected = full.index_select(d, torch.tensor(rows, device=full.device))
    return _close(expected, probe), d


def _close(a: Tensor, b: Tensor) -> bool:
    a, b = a.detach(), b.detach()
    if not a.is_floating_point():
        return torch.equal(a, b)
    tol = _tolerance(a.dtype)
    scale = a.abs().max().item() if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * scale))


def signature(batch: Any, calls: Dict[nn.Module, List[Call]],
              uses: Dict[str, Set[tuple]]) -> Optional[Hashable]:
    """What the layout of the samples depends on when control flow depends on shapes only (the
    module docstring's *signature*); None when a non-tensor value in it cannot be hashed."""
    try:
        key = (*_batch_layout(batch),
               tuple((m, tuple((_layout(c.in_leaves), _layout(c.out_leaves)) for c in cs))
                     for m, cs in calls.items()),
               frozenset((name, frozenset(stacks)) for name, stacks in uses.items()))
        hash(key)
    except TypeError:
        return None
    return key


def _batch_layout(batch: Any) -> tuple:
    """The part of the signature that the batch alone decides (its first two entries)."""
    leaves, spec = tree_flatten(batch)
    return spec, _layout(leaves)


def _same(a: tuple, b: tuple) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a value whose == is not a truth value (an array): not the same
        return False


def _layout(leaves: List[Any]) -> tuple:
    return tuple((t.shape, t.dtype, t.device, t.requires_grad) if isinstance(t, Tensor)
                 else (type(t), _value(t)) for t in leaves)


def _value(t: Any) -> Any:
    # An object compared by identity (a fresh key-value cache per forward, as Hugging Face
    # models return) has no value to compare: its type stands for it, so that later batches
    # reuse the proof instead of each being a new signature.
    return None if type(t).__eq__ is object.__eq__ else t


class _Uses(TorchFunctionMode):
    """Records, for each parameter (by id), the stacks of running modules at its uses."""

    def __init__(self, ids: Dict[int, str], stack: List[nn.Module]) -> None:
        super().__init__()
        self.ids, self.stack = ids, stack
        self.uses: Dict[str, Set[Tuple[nn.Module, ...]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                name = self.ids.get(id(t))
                if name is not None:
                    self.uses.setdefault(name, set()).add(tuple(self.stack))
        return func(*args, **kwargs)


class _Recorder:
    """Hooks on every module: its calls (inputs, outputs), the module stack, and the output
    gradients of the modules in ``keep_grads`` (those that may own a parameter)."""

    def __init__(self, model: nn.Module, keep_grads: Set[nn.Module]) -> None:
        self.calls: Dict[nn.Module, List[Call]] = {}
        self.stack: List[nn.Module] = []
        self.keep_grads = keep_grads
        self.wanted: Set[int] = set()  # ids of calls whose output gradients are kept
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post, with_kwargs=True,
                                                        always_call=True))

    def _pre(self, m: nn.Module, args: tuple, kwargs: dict) -> None:
        self.stack.append(m)
        leaves = tree_leaves((args, kwargs))
        call = Call(args, kwargs, leaves, [],
                    in_versions=[t._version if isinstance(t, Tensor) else 0 for t in leaves])
        self.calls.setdefault(m, []).append(call)

    def _post(self, m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.stack.pop()
        call = self.calls[m][-1]
        call.out_leaves, call.out_spec = tree_flatten(out)
        call.grads = [None] * len(call.out_leaves)
        call.out_versions = [t._version if isinstance(t, Tensor) else 0 for t in call.out_leaves]
        if m not in self.keep_grads:
            return
        for i, t in enumerate(call.out_leaves):
            if isinstance(t, Tensor) and t.requires_grad:
                # A tensor hook sees the gradient of this very output even if a later in-place
                # op (ReLU(inplace=True)) rewrites the tensor.
                t.register_hook(self._grad_hook(call, i))

    def _grad_hook(self, call: Call, i: int):
        # The hook lives on the output's autograd node; a strong reference back to the call
        # (which holds that output) would be a cycle that keeps the batch's activations alive
        # until the garbage collector runs, so every batch would allocate fresh memory.
        ref, wanted = weakref.ref(call), self.wanted

        def hook(g: Tensor) -> None:
            c = ref()
            if c is not None and id(c) in wanted:
                c.grads[i] = g.detach()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class PerSampleEngine:
    """Σ_k |∂‖F(x_k)‖²/∂θ| for the given parameters, per batch."""

    def __init__(self, model: nn.Module, params: Dict[str, Tensor], forward: Forward) -> None:
        self.model, self.params, self.forward = model, params, forward
        self.ids = {id(p): n for n, p in params.items()}
        self.holders = {m for m in model.modules()
                        if any(id(p) in self.ids for p in m.parameters())}
        self.functional = Functional()
        # signature -> {module: (input dims, output dims)} of its proven modules (see above)
        self.proofs: Dict[Hashable, Dict[nn.Module, Tuple[List, List, bool]]] = {}
        # signature -> the modules whose expanded output left F unchanged (see _expanded)
        self.widened: Dict[Hashable, frozenset] = {}
        self.last_key: Optional[Hashable] = None

    def accumulate(self, batch: Any, n: int, sums: Dict[str, Tensor]) -> None:
        # A batch with the previous batch's signature, whose expanded outputs were checked
        # already, expands them in its one forward: no second forward and backward for them.
        # Tried only when the batch's own shapes are the previous batch's (padding to each
        # batch's longest sequence makes every signature new: no forward is wasted on them).
        widen = self.widened.get(self.last_key) if self.last_key is not None else None
        if widen is not None and not _same(_batch_layout(batch), self.last_key[:2]):
            widen = None
        if widen is None or not self._accumulate(batch, n, sums, widen):
            self._accumulate(batch, n, sums, None)

    def _accumulate(self, batch: Any, n: int, sums: Dict[str, Tensor],
                    widen: Optional[frozenset]) -> bool:
        """One batch; with ``widen``, those modules' outputs are expanded in the forward, and
        False is returned (nothing added) if the batch's signature is not the previous one."""
        rec = _Recorder(self.model, keep_grads=self.holders)
        wide: Dict[nn.Module, List[Call]] = {}
        # registered after the recorder's hooks: the recorder sees the outputs as they were
        handles = [m.register_forward_hook(self._widener(n, wide), with_kwargs=True)
                   for m in widen or ()]
        try:
            with torch.enable_grad():
                uses_mode = _Uses(self.ids, rec.stack)
                with uses_mode:
                    outputs = self.forward(batch)
                rec.remove()
                for h in handles:
                    h.remove()
                loss = squared_norm(outputs)
                key = signature(batch, rec.calls, uses_mode.uses)
                if widen is not None and key != self.last_key:
                    return False
                proven, shared = self._prove(key, rec, batch, outputs, n)
                plan, tied, expand, rest = self._assign(uses_mode.uses, proven, shared, rec)
                if widen is not None and (set(expand) != widen
                                          or any(len(wide.get(m, [])) != 1 for m in widen)):
                    return False
                extra = [(c, i) for m in expand for c in wide.get(m, ())
                         for i, d in enumerate(c.out_dims) if d == 0]
                self._backward(loss, plan, tied, rec, rest, extra)
        finally:
            rec.remove()
            for h in handles:
                h.remove()
        self.last_key = key
        for m, (call, fast, local) in plan.items():
            if all(g is None for g in call.grads):
                continue  # its output does not reach F: every per-sample gradient is zero
            if fast:
                with torch.no_grad():
                    rule_for(m).apply(m, call, {attr: sums[name] for attr, name in fast.items()})
            if local:
                self._vjp([(m, call, local)], sums)
        for owners, names in tied.items():
            self._vjp([(m, plan[m][0], {rel: name for rel, name in self._rels(m, names)})
                       for m in owners], sums)
        if expand and widen is not None:
            for m, rels in expand.items():
                self._vjp([(m, wide[m][0], rels)], sums)
        elif expand:
            left = self._expanded(batch, n, expand, [o.detach() for o in outputs], sums)
            if not left and key is not None:
                self.widened[key] = frozenset(expand)
            rest += left
        if rest:
            self._whole(batch, n, rest, sums)
        return True

    # -- 1. which modules are proven, and their sample dimensions
    def _prove(self, key: Optional[Hashable], rec: _Recorder, batch: Any,
               outputs: List[Tensor], n: int) -> Tuple[Dict[nn.Module, Call], Set[nn.Module]]:
        dims = self.proofs.get(key) if key is not None else None
        if dims is None:
            dims = self._probe(rec, batch, outputs, n)
            if key is not None:
                self.proofs[key] = dims
        proven, shared = {}, set()
        for m, (in_dims, out_dims, is_shared) in dims.items():
            if is_shared:
                shared.add(m)
                continue
            call = rec.calls[m][0]
            if any(isinstance(t, Tensor) and t._version != v
                   for t, v in zip(call.in_leaves, call.in_versions)):
                continue  # an input changed in place after the call: not what the module saw
            call.in_dims, call.out_dims = list(in_dims), list(out_dims)
            proven[m] = call
        return proven, shared

    def _probe(self, rec: _Recorder, batch: Any, outputs: List[Tensor], n: int
               ) -> Dict[nn.Module, Tuple[List, List, bool]]:
        """Runs the probe batch; {module: (input dims, output dims, shared)} of the modules it
        proves (shared: no input or output has a sample dimension, and the outputs that need a
        gradient have a leading dimension of size 1, which broadcasts over the samples)."""
        rows = probe_rows(n)
        probe = _Recorder(self.model, keep_grads=set())
        try:
            probe_outputs = self.forward(select_samples(batch, n, rows))
        except Exception:  # e.g. a model written for one batch size: nothing is proven
            return {}
        finally:
            probe.remove()
        for full, small in zip(outputs, probe_outputs):
            ok, d = sample_dim(full, small, n, rows)
            if not ok or d is None:
                return {}
        proven = {}
        for m, calls in rec.calls.items():
            if m not in self.holders:
                continue  # no parameter of ours inside: never an owner
            small = probe.calls.get(m, [])
            if len(calls) != 1 or len(small) != 1:
                continue
            call, other = calls[0], small[0]
            if (len(call.in_leaves) != len(other.in_leaves)
                    or len(call.out_leaves) != len(other.out_leaves)):
                continue
            ins = [sample_dim(a, b, n, rows) for a, b in zip(call.in_leaves, other.in_leaves)]
            outs = [sample_dim(a, b, n, rows) for a, b in zip(call.out_leaves, other.out_leaves)]
            if not all(ok for ok, _ in ins + outs):
                continue
            shared = [t for t, (_, d) in zip(call.out_leaves, outs)
                      if isinstance(t, Tensor) and t.requires_grad and d is None]
            in_dims, out_dims = [d for _, d in ins], [d for _, d in outs]
            if not shared:
                proven[m] = (in_dims, out_dims, False)
            elif (all(d is None for d in in_dims + out_dims)
                  and all(t.dim() > 0 and t.shape[0] == 1 for t in shared)):
                # the same output for every sample, e.g. position embeddings of (1, T)
                # positions: its gradient is summed over the samples it broadcasts to
                # (see _expanded)
                proven[m] = (in_dims, out_dims, True)
        return proven

    # -- 2. which parameter goes where
    def _assign(self, uses: Dict[str, Set[tuple]], proven: Dict[nn.Module, Call],
                shared: Set[nn.Module], rec: _Recorder) -> Tuple[dict, dict, dict, List[str]]:
        plan: Dict[nn.Module, Tuple[Call, Dict[str, str], Dict[str, str]]] = {}
        tied: Dict[Tuple[nn.Module, ...], List[str]] = {}
        expand: Dict[nn.Module, Dict[str, str]] = {}
        rest: List[str] = []
        self.unseen = [n for n in self.params if n not in uses]
        for name, stacks in uses.items():
            p = self.params[name]
            first = next(iter(stacks))
            common = [m for m in first if all(m in s for s in stacks)]
            owner = next((m for m in reversed(common) if m in proven or m in shared), None)
            if owner in shared:
                rel = next(r for r, q in owner.named_parameters(remove_duplicate=False)
                           if q is p)
                expand.setdefault(owner, {})[rel] = name
                continue
            if owner is None:
                owners = self._tied_owners(p, stacks, proven)
                if owners is None:
                    rest.append(name)
                else:
                    tied.setdefault(owners, []).append(name)
                    for m in owners:
                        plan.setdefault(m, (proven[m], {}, {}))
                continue
            call = proven[owner]
            entry = plan.setdefault(owner, (call, {}, {}))
            rel = next(r for r, q in owner.named_parameters(remove_duplicate=False) if q is p)
            rule = rule_for(owner)
            # a rule knows how the module uses its parameters in its own forward, nowhere else
            if (rule is not None and rule.covers(rel) and all(s[-1] is owner for s in stacks)
                    and rule.check(owner, call)):
                entry[1][rel] = name
            else:
                entry[2][rel] = name
        for _, (call, _, _) in plan.items():
            rec.wanted.add(id(call))
        return plan, tied, expand, rest

    def _tied_owners(self, p: Tensor, stacks: Set[tuple], proven: Dict[nn.Module, Call]
                     ) -> Optional[Tuple[nn.Module, ...]]:
        """For a parameter used by several modules (tied weights, e.g. GPT-2's token embedding
        and output layer): the innermost proven module holding it at each use, when every use
        has one and none of them runs inside another. Sample k's gradient is then the sum of
        their vector-Jacobian products at sample k (summed before the absolute value)."""
        at_use = []
        for stack in stacks:
            owner = next((m for m in reversed(stack) if m in proven
                          and any(q is p for q in m.parameters())), None)
            if owner is None:
                return None
            at_use.append((owner, stack))
        owners = tuple(dict.fromkeys(o for o, _ in at_use))
        if any(other in stack for o, stack in at_use for other in owners if other is not o):
            return None  # one owner runs inside another: its part would be counted twice
        return owners

    def _rels(self, m: nn.Module, names: List[str]) -> List[Tuple[str, str]]:
        """(name within m, model-level name) of the given parameters that m holds."""
        ps = {id(self.params[n]): n for n in names}
        return [(rel, ps[id(q)]) for rel, q in m.named_parameters(remove_duplicate=False)
                if id(q) in ps]

    # -- 3. one backward: every planned module's output gradient
    def _backward(self, loss: Tensor, plan: dict, tied: dict, rec: _Recorder,
                  rest: List[str], extra: List[Tuple[Call, int]]) -> None:
        """``extra``: expanded outputs (see _expanded) whose gradient is wanted too."""
        tied_of: Dict[nn.Module, List[str]] = {}
        for owners, names in tied.items():
            for m in owners:
                tied_of.setdefault(m, []).extend(names)
        targets: List[Tensor] = []
        slots: List[Tuple[Optional[Call], int]] = []
        for m, (call, fast, local) in plan.items():
            mutated = False
            for i, t in enumerate(call.out_leaves):
                if isinstance(t, Tensor) and t.requires_grad:
                    if t._version == call.out_versions[i]:
                        targets.append(t)
                        slots.append((call, i))
                    else:
                        mutated = True  # its tensor hook captures the gradient on the way
            if mutated:
                # make sure the backward passes through this module (nothing below it may need a
                # gradient): ask for the smallest parameter it uses
                p = min((self.params[n] for n in (*fast.values(), *local.values(),
                                                  *tied_of.get(m, ()))),
                        key=lambda q: q.numel())
                targets.append(p)
                slots.append((None, 0))
        for call, i in extra:
            targets.append(call.out_leaves[i])
            slots.append((call, i))
        for name in self.unseen:  # used by an operation the mode did not see? then check
            targets.append(self.params[name])
            slots.append((None, -1))
        if not targets:
            return
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
        for (call, i), g, t in zip(slots, grads, targets):
            if call is not None:
                call.grads[i] = None if g is None else g.detach()
            elif i == -1 and g is not None:
                rest.append(self.ids[id(t)])

    # -- 4. the torch.func paths
    def _vjp(self, parts: List[Tuple[nn.Module, Call, Dict[str, str]]],
             sums: Dict[str, Tensor]) -> None:
        """Σ_k |per-sample gradient| of the named parameters from the vector-Jacobian products
        of the given module calls at sample k, summed over the calls (one call, or the owners
        of a tied parameter); ``names`` maps a name within the module to the model's name."""
        pieces, leaves, dims = [], [], []
        for m, call, names in parts:
            keep = [i for i, g in enumerate(call.grads) if g is not None]
            if not keep:
                continue  # this call's output does not reach F
            _, in_spec = tree_flatten((call.args, call.kwargs))
            size = len(call.in_leaves) + len(keep)
            pieces.append((m, names, keep, len(call.in_leaves), in_spec, size))
            leaves += call.in_leaves + [call.grads[i] for i in keep]
            dims += call.in_dims + [call.out_dims[i] for i in keep]
        if not pieces:
            return

        def vjp(params: Dict[str, Tensor], sample: List[Any]) -> Tensor:
            total, start = 0, 0
            for m, names, keep, n_in, in_spec, size in pieces:
                mine = sample[start:start + size]
                start += size
                args, kwargs = tree_unflatten(mine[:n_in], in_spec)
                outs = tree_leaves(torch.func.functional_call(
                    m, {rel: params[name] for rel, name in names.items()}, args, kwargs))
                total = total + sum((outs[i] * g).sum() for i, g in zip(keep, mine[n_in:]))
            return total

        n = next(t.shape[d] for t, d in zip(leaves, dims) if d is not None)
        wanted = {name for _, names, *_ in pieces for name in names.values()}
        params = {name: self.params[name].detach() for name in wanted}
        acc = {name: sums[name] for name in wanted}
        self.functional.add_abs_sums([m for m, *_ in pieces], vjp, params, leaves, dims, n, acc)

    def _expanded(self, batch: Any, n: int, expand: Dict[nn.Module, Dict[str, str]],
                  outputs: List[Tensor], sums: Dict[str, Tensor]) -> List[str]:
        """Parameters of modules whose output every sample shares (position embeddings of
        (1, T) positions): the forward runs again with each such output expanded to the n
        samples it broadcasts to, which computes F unchanged (checked) and makes the output
        gradient per sample; then each module's vector-Jacobian product at sample k. Returns the
        names left to the whole-network path (F changed, or a module ran other than once)."""
        calls: Dict[nn.Module, List[Call]] = {}
        handles = [m.register_forward_hook(self._widener(n, calls), with_kwargs=True)
                   for m in expand]
        try:
            with torch.enable_grad():
                again = self.forward(batch)
        finally:
            for h in handles:
                h.remove()
        names = [name for rels in expand.values() for name in rels.values()]
        if (any(len(calls.get(m, [])) != 1 for m in expand) or len(again) != len(outputs)
                or not all(a.shape == o.shape and _close(o, a) for a, o in zip(again, outputs))):
            return names
        targets = [(c, i) for m in expand for c in calls[m] for i, d in enumerate(c.out_dims)
                   if d == 0]
        grads = torch.autograd.grad(squared_norm(again), [c.out_leaves[i] for c, i in targets],
                                    allow_unused=True)
        for (c, i), g in zip(targets, grads):
            c.grads[i] = None if g is None else g.detach()
        for m, rels in expand.items():
            self._vjp([(m, calls[m][0], rels)], sums)
        return []

    @staticmethod
    def _widener(n: int, calls: Dict[nn.Module, List[Call]]) -> Callable:
        """A forward hook that expands a module's outputs with a leading dimension of 1 to the
        n samples they broadcast to, recording each call (with its expanded outputs) in
        ``calls``."""
        def widen(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            leaves, spec = tree_flatten(out)
            wide = [t.expand(n, *t.shape[1:]) if isinstance(t, Tensor) and t.requires_grad
                    and t.dim() > 0 and t.shape[0] == 1 else t for t in leaves]
            ins = tree_leaves((args, kwargs))
            calls.setdefault(m, []).append(Call(
                args, kwargs, ins, wide, spec, in_dims=[None] * len(ins),
                out_dims=[0 if w is not t else None for w, t in zip(wide, leaves)],
                grads=[None] * len(wide)))
            return tree_unflatten(wide, spec)
        return widen

    def _whole(self, batch: Any, n: int, names: List[str], sums: Dict[str, Tensor]) -> None:
        leaves, spec = tree_flatten(batch)
        network = _Network(self.model, self.forward)

        def loss(params: Dict[str, Tensor], sample: List[Any]) -> Tensor:
            return squared_norm(torch.func.functional_call(
                network, params, (tree_unflatten(sample, spec),)))

        params = {"model." + name: self.params[name].detach() for name in names}
        acc = {"model." + name: sums[name] for name in names}
        self.functional.add_abs_sums([self.model], loss, params, leaves, sample_dims(batch, n),
                                     n, acc)


class _Network(nn.Module):
    """The user's forward as a module, so that torch.func.functional_call can swap the model's
    parameters for the per-sample ones while it runs."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model, self.run = model, forward

    def forward(self, batch: Any) -> List[Tensor]:
        return self.run(batch)
