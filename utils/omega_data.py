"""``--omega_data``: the inputs on which the importance Omega of each task is computed.

MAS's importance is the sensitivity of the learnt function's output, |d||F(x)||^2/d theta|
(Aljundi et al. 2018, Eq. 2): it needs inputs but no labels (Sec. 3-4), so it can be computed on
any unlabeled data, in particular on data from where the model is deployed, to preserve what
matters there. The choices:

* ``train`` (default): the task's training inputs, as the original;
* ``test``: the task's test inputs (labels unused);
* a folder: every image under it (sub-folders are searched, none is needed), the same images
  for every task, preprocessed as the run's images are (resized, channels, normalisation; for
  Permuted Digits with the task's pixel permutation).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from utils import AppError
from utils.data import MNIST_MEAN, MNIST_STD, Task, pixel_permutation
from utils.folders import ImageFolderSplit, Preprocessing

SOURCES = ("train", "test")
# how images from a folder become the inputs of a built-in benchmark (its images are 8x8
# digits in [0, 1] or MNIST's 28x28 normalised ones)
BUILT_IN = {
    "split-digits": Preprocessing(8, 1, "none", (0.0,), (1.0,)),
    "permuted-digits": Preprocessing(8, 1, "none", (0.0,), (1.0,)),
    "split-mnist": Preprocessing(28, 1, "none", (MNIST_MEAN,), (MNIST_STD,)),
}


def parse_omega_data(text: str) -> str:
    """The flag's value: train, test or an existing folder (argparse's ``type``)."""
    if text in SOURCES or Path(text).is_dir():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither train, test nor a folder")


def unlabeled_images(folder: Path) -> list[str]:
    """Every image file under ``folder`` (recursively, sorted); AppError if there is none."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not folder.is_dir():
        raise AppError(f"--omega_data {folder}: no such folder")
    files = sorted(str(p) for p in folder.rglob("*")
                   if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise AppError(f"--omega_data {folder}: no images ({', '.join(IMG_EXTENSIONS[:4])}, "
                       "...) in it or its sub-folders")
    return files


class Permuted(Dataset):
    """``dataset``'s inputs with their pixels in the order ``permutation`` (labels kept)."""

    def __init__(self, dataset: Dataset, permutation: torch.Tensor) -> None:
        self.dataset, self.permutation = dataset, permutation

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        x, y = self.dataset[i]
        return x.flatten()[self.permutation].reshape(x.shape), y


class OmegaInputs:
    """Per task, the dataset whose inputs (first item of each sample) Omega is computed on."""

    def __init__(self, source: str, benchmark: str, tasks: list[Task]) -> None:
        self.source, self.benchmark, self.tasks = source, benchmark, tasks
        self.files = None if source in SOURCES else unlabeled_images(Path(source))

    def dataset(self, t: int) -> Dataset:
        task = self.tasks[t]
        if self.files is None:
            return task.train if self.source == "train" else task.test
        preprocessing = task.preprocessing or BUILT_IN[self.benchmark]
        images = ImageFolderSplit([(path, 0) for path in self.files], preprocessing,
                                  train=False)
        if self.benchmark != "permuted-digits":
            return images
        pixels = preprocessing.image_size ** 2 * preprocessing.channels
        return Permuted(images, pixel_permutation(t, pixels))
