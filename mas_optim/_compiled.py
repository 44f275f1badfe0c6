"""What the torch.compile'd steps (``fused=True`` off the CPU C kernels) share: their
hyperparameters as 0-dim tensors on the parameters' device."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


class DeviceScalars:
    """Hyperparameters as 0-dim tensors on the parameters' device and in their dtype, kept
    between steps and refilled only where a value changed. As tensors, a learning-rate schedule
    does not recompile the step; kept and refilled (``fill_`` is a kernel launch), the step never
    waits for the GPU, as ``torch.tensor(x, device="cuda")`` would (a blocking host-to-device
    copy: the host could no longer run ahead of the GPU)."""

    __slots__ = ("values", "tensors")

    def __init__(self) -> None:
        self.values: Tuple[float, ...] = ()
        self.tensors: Optional[Tuple[Tensor, ...]] = None

    def get(self, values: Tuple[float, ...], like: Tensor) -> Tuple[Tensor, ...]:
        tensors = self.tensors
        if (tensors is None or len(tensors) != len(values) or tensors[0].device != like.device
                or tensors[0].dtype != like.dtype):
            tensors = tuple(torch.full((), v, dtype=like.dtype, device=like.device)
                            for v in values)
            self.tensors = tensors
        elif values != self.values:
            for t, new, old in zip(tensors, values, self.values):
                if new != old:
                    t.fill_(new)
        self.values = values
        return tensors
