"""The shared backbone of a run, with errors worded for the command line.

``model_class`` builds models and raises ``ValueError``s worded for code; here the flags are
checked before it is called, and a weights file is read, so that the user gets one line naming
the flag or the file.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from model_class import ALEXNET_MIN_SIZE, ARCHS, alexnet_fits, build_shared
from utils import AppError
from utils.checkpoint import load_tensors


def check_arch(arch: str, input_shape: tuple[int, ...]) -> None:
    """``--arch`` fits the inputs (also for a stored config, which argparse never saw)."""
    if arch not in ARCHS:
        raise AppError(f"--arch {arch}: unknown (choose from {', '.join(ARCHS)})")
    if arch == "alexnet" and not alexnet_fits(input_shape):
        raise AppError(f"--arch alexnet needs RGB images of at least {ALEXNET_MIN_SIZE} pixels "
                       f"(got input shape {tuple(input_shape)}); use --data_dir and --image_size")


def build_backbone(arch: str, input_shape: tuple[int, ...], hidden: int,
                   pretrained: str | None = None) -> tuple[nn.Module, int]:
    """``model_class.build_shared`` for the flags; ``pretrained``: a weights file
    (``--pretrained``), read with the weights-only loader."""
    check_arch(arch, input_shape)
    state = load_tensors(Path(pretrained)) if pretrained else None
    try:
        return build_shared(arch, input_shape, hidden, state)
    except ValueError as exc:  # only the weights can still be wrong here
        raise AppError(f"--pretrained {pretrained}: {exc}") from None
