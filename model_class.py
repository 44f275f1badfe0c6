"""The shared model (alexnet | cnn | mlp backbone) and one classification head per task.

Errors here are ``ValueError``s worded for code, not for the command line: ``train.py`` checks
its flags and words its own messages (``utils/backbone.py``); this module imports nothing of
the application.

As in the original repository, everything but the last classification layer is shared by all
tasks and regularised by MAS; the last layer (the "head") belongs to one task. ``TaskModel``
names its parameters ``shared.*`` and ``head.*``: these names are the keys of reg_params, of
``shared_model.pth`` and of ``Task_k/head.pth``, the single key that ties them together.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

ARCHS = ("mlp", "cnn", "alexnet")
ALEXNET_MIN_SIZE = 63  # smallest input for which AlexNet's feature maps stay non-empty
ALEXNET_WIDTH = 4096  # AlexNet's classifier width (what --pretrained weights need)


class TaskModel(nn.Module):
    """``head(shared(x))``: the shared backbone with the head of the current task."""

    def __init__(self, shared: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.shared = shared
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(x))

    def part_state(self, part: str) -> dict[str, torch.Tensor]:
        """The tensors of ``part`` ("shared" or "head") under their full names (``shared.*``,
        ``head.*``): the names reg_params and the saved files use."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(part + ".")}

    def load_part(self, part: str, state: dict[str, torch.Tensor]) -> None:
        """Load a ``part_state`` dict (strict: every tensor of the part, nothing else)."""
        getattr(self, part).load_state_dict({k.removeprefix(part + "."): v
                                             for k, v in state.items()})


class AlexNetShared(nn.Module):
    """AlexNet without its last layer: ``features``, ``avgpool`` and ``classifier[:-1]``, with
    torchvision's parameter names so that torchvision's ImageNet weights load as they are.

    ``width`` is the classifier's hidden width (4096 in AlexNet); tests shrink it to keep the
    AlexNet code path fast (57M parameters make every checkpoint ~650 MB)."""

    def __init__(self, width: int = 4096) -> None:
        super().__init__()
        from torchvision.models import alexnet

        full = alexnet(weights=None)  # never weights=...: that would download
        self.features = full.features
        self.avgpool = full.avgpool
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, width), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(width, width), nn.ReLU(inplace=True))
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _mlp(input_shape: tuple[int, ...], hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU())


def _cnn(input_shape: tuple[int, ...], hidden: int) -> nn.Sequential:
    """Two conv blocks and a fully connected layer; works from 8x8 digits upwards."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64 * 4, hidden), nn.ReLU())


def alexnet_fits(input_shape: tuple[int, ...]) -> bool:
    """Whether AlexNet takes inputs of ``input_shape``: RGB, at least ``ALEXNET_MIN_SIZE`` px."""
    return (len(input_shape) == 3 and input_shape[0] == 3
            and min(input_shape[1:]) >= ALEXNET_MIN_SIZE)


def load_alexnet_weights(shared: AlexNetShared, state: Mapping[str, torch.Tensor]) -> None:
    """Load torchvision AlexNet ImageNet weights (a state dict; its last layer is dropped).
    A ValueError if ``state`` is not such weights for ``shared``."""
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict, got {type(state).__name__}")
    kept = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}
    try:
        shared.load_state_dict(kept)
    except RuntimeError as exc:  # load_state_dict's missing/unexpected keys, wrong shapes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ValueError(f"not torchvision AlexNet weights ({first})") from None


def build_shared(arch: str, input_shape: tuple[int, ...], hidden: int,
                 pretrained: Mapping[str, torch.Tensor] | None = None
                 ) -> tuple[nn.Module, int]:
    """The shared backbone for ``arch`` and its output width (the heads' input width);
    ``pretrained``: AlexNet weights to load (``load_alexnet_weights``). ValueError for an
    unknown ``arch`` or inputs AlexNet does not take (``alexnet_fits``)."""
    if arch == "mlp":
        return _mlp(input_shape, hidden), hidden
    if arch == "cnn":
        return _cnn(input_shape, hidden), hidden
    if arch != "alexnet":
        raise ValueError(f"arch {arch!r}: unknown (choose from {', '.join(ARCHS)})")
    if not alexnet_fits(input_shape):
        raise ValueError(f"alexnet needs RGB images of at least {ALEXNET_MIN_SIZE} pixels "
                         f"(got input shape {tuple(input_shape)})")
    shared = AlexNetShared(ALEXNET_WIDTH)
    if pretrained is not None:
        load_alexnet_weights(shared, pretrained)
    return shared, shared.out_features


def new_head(in_features: int, num_classes: int, seed: int) -> nn.Linear:
    """A fresh head whose initialisation depends only on ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes)


def freeze_first_layers(model: TaskModel, count: int) -> list[str]:
    """Freeze the first ``count`` weight layers (Conv2d/Linear) of the shared backbone and return
    the names of the frozen parameters (they are neither trained nor regularised).

    For AlexNet these are its first ``count`` conv layers: ``--num_freeze_layers 2`` keeps the
    two lowest, most generic ImageNet filters fixed, as the original's default intends.
    """
    frozen: list[str] = []
    layers = [(name, m) for name, m in model.shared.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, module in layers[:count]:
        for pname, p in module.named_parameters():
            p.requires_grad_(False)
            frozen.append(f"shared.{name}.{pname}")
    return frozen
