"""Task sequences: Split/Permuted Digits (bundled with scikit-learn), Split MNIST, and how every
sequence is batched and sharded over torchrun processes. Image folders: ``utils.folders``.

Every task is a classification problem with its own label space (0..C-1) and its own head
(the task-incremental setting of MAS, Aljundi et al. 2018, Sec. 5). Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from utils import AppError

if TYPE_CHECKING:  # only a type here; utils.folders imports this module
    from utils.folders import Preprocessing

BENCHMARKS = ("split-digits", "permuted-digits", "split-mnist")
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0  # the train/test split is fixed: it is part of the benchmark, not of --seed
NUM_PERMUTED_TASKS = 5
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # split-mnist's inputs: (pixel / 255 - mean) / std
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class Task:
    """One task of the sequence: its name, class names (index = label) and datasets, and for
    image folders the preprocessing that turned the images into inputs."""

    name: str
    classes: list[str]
    train: Dataset
    test: Dataset
    preprocessing: Preprocessing | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        p = self.preprocessing
        if p is not None:  # known without drawing a random flip for a sample
            return (p.channels, p.image_size, p.image_size)
        return tuple(self.train[0][0].shape)


def derived_seed(seed: int, *parts: object) -> int:
    """A seed that is a pure function of (--seed, parts): e.g. (task, epoch) for one epoch's data
    order, so a resumed run shuffles exactly as an uninterrupted one without replaying any RNG."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_loader(dataset: Dataset, batch_size: int, shuffle_seed: int | None = None) -> DataLoader:
    """Batches in a fixed order (``shuffle_seed`` None) or shuffled as ``train_shard`` shuffles
    for one process: ``train_shard(dataset, batch_size, shuffle_seed, 0, 1)``."""
    if shuffle_seed is not None:
        return train_shard(dataset, batch_size, shuffle_seed, 0, 1)
    return _loader(dataset, batch_size=batch_size)


# --- scikit-learn digits -----------------------------------------------------------------------
def _digits() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """All 1,797 8x8 digits as (N, 1, 8, 8) floats in [0, 1], labels, and the fixed stratified
    train/test index split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED)
    return x, y, np.sort(train_idx), np.sort(test_idx)


def _split_tasks(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                 y_test: torch.Tensor, prefix: str) -> list[Task]:
    """Five tasks of two consecutive digits each (0/1, 2/3, ...), labels remapped to 0/1."""
    tasks = []
    for first in range(0, 10, 2):
        def part(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
            keep = (y == first) | (y == first + 1)
            return TensorDataset(x[keep], y[keep] - first)
        tasks.append(Task(f"{prefix} {first}/{first + 1}", [str(first), str(first + 1)],
                          part(x_train, y_train), part(x_test, y_test)))
    return tasks


def split_digits() -> list[Task]:
    """Split Digits: scikit-learn's digits as 5 two-class tasks (0/1, 2/3, 4/5, 6/7, 8/9)."""
    x, y, tr, te = _digits()
    return _split_tasks(x[tr], y[tr], x[te], y[te], "digits")


def permuted_digits() -> list[Task]:
    """Permuted Digits: 5 tasks of all 10 digits, task k with its own fixed pixel permutation
    (task 1 unpermuted). Permutations are fixed, independent of --seed."""
    x, y, tr, te = _digits()
    flat = x.flatten(1)
    tasks = []
    for k in range(NUM_PERMUTED_TASKS):
        xk = flat[:, pixel_permutation(k, flat.shape[1])].reshape(x.shape)
        tasks.append(Task(f"permutation {k + 1}", [str(d) for d in range(10)],
                          TensorDataset(xk[tr], y[tr]), TensorDataset(xk[te], y[te])))
    return tasks


def pixel_permutation(k: int, pixels: int) -> torch.Tensor:
    """The pixel order of Permuted Digits' task ``k`` (0-based; task 0 is unpermuted)."""
    if k == 0:
        return torch.arange(pixels)
    return torch.randperm(pixels, generator=torch.Generator().manual_seed(k))


# --- MNIST -------------------------------------------------------------------------------------
def split_mnist(root: str | None) -> list[Task]:
    """Split MNIST (the original repository's to-do) from MNIST's raw idx files under
    ``root/MNIST/raw/``, read by torchvision with ``download=False``."""
    if not root:
        raise AppError("--benchmark split-mnist needs --mnist_root DIR (the folder holding "
                       "MNIST/raw/ with the four idx files)")
    from torchvision.datasets import MNIST

    try:
        train, test = (MNIST(root, train=flag, download=False) for flag in (True, False))
    except RuntimeError:
        raw = Path(root) / "MNIST" / "raw"
        raise AppError(
            f"--mnist_root {root}: MNIST not found; put {', '.join(MNIST_FILES)} (unzipped) in "
            f"{raw}/ -- e.g. fetch them where there is network with "
            f"torchvision.datasets.MNIST('{root}', download=True)") from None

    def tensors(ds: MNIST) -> tuple[torch.Tensor, torch.Tensor]:
        x = (ds.data.float().div(255.0).sub(MNIST_MEAN).div(MNIST_STD)).unsqueeze(1)
        return x, ds.targets.long()

    return _split_tasks(*tensors(train), *tensors(test), prefix="mnist")



# --- sharding over torchrun processes ----------------------------------------------------------
def _loader(dataset: Dataset, **kwargs: Any) -> DataLoader:
    # a private generator: DataLoader otherwise draws its base seed from the global RNG, which
    # would make evaluation perturb the dropout/augmentation randomness of training
    return DataLoader(dataset, generator=torch.Generator().manual_seed(0), **kwargs)


def train_shard(dataset: Dataset, batch_size: int, shuffle_seed: int, rank: int,
                world: int) -> DataLoader:
    """This process's share of one training epoch: torch's ``DistributedSampler`` with
    ``num_replicas=world`` (one process included), ``seed=shuffle_seed``, ``drop_last=False``.

    The epoch's order is ``torch.randperm(n)`` from a generator seeded with ``shuffle_seed`` (a
    pure function of (seed, task, epoch), so a resumed run shuffles as an uninterrupted one);
    it does not depend on ``world``. The sampler pads it by repeating its start up to a multiple
    of ``world`` and process ``rank`` takes every ``world``-th index from position ``rank``, so
    every process has the same number of samples and of batches (DDP needs the same number of
    steps on every rank). Batches hold ``ceil(batch_size / world)`` samples, so one step over
    all processes sees ``batch_size`` samples when ``world`` divides it: exactly the samples of
    one single-process batch.
    """
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=shuffle_seed, drop_last=False)
    return _loader(dataset, batch_size=math.ceil(batch_size / world), sampler=sampler)


def fixed_shard(dataset: Dataset, batch_size: int, rank: int, world: int) -> DataLoader:
    """This process's share of the data in fixed order (evaluation, importance): the batches of
    ``make_loader(dataset, batch_size)``, dealt out whole, round robin (batch i to process
    i mod world). No padding (unlike ``DistributedSampler``): every sample is seen exactly once
    over all processes, so counts and sums reduced over the processes equal those of one
    process (also for the importance's batch formula, which depends on how samples are
    grouped). With ``world == 1`` this is ``make_loader`` itself."""
    if world == 1:
        return make_loader(dataset, batch_size)
    n = len(dataset)  # type: ignore[arg-type]
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    return _loader(dataset, batch_sampler=batches[rank::world])
