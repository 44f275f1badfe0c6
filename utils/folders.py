"""Image folders, the original repository's layout: ``DIR/<task>/{train,test}/<class>/<image>``.

``image_folder_tasks`` scans the folders, picks the preprocessing the data and the backbone need
(``Preprocessing``: size, channels, augmentation, normalisation), decodes the images once into a
uint8 cache when they fit ``--cache_mb``, and returns one ``Task`` per task folder.
``image_side`` reads the size of the images (for the default backbone of small images).
"""
from __future__ import annotations

import copy
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import AppError
from utils.data import Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTS = ("none", "flip")
# inputs (pixel / 255 - mean) / std with ImageNet's statistics, those of the first task's
# training images, or mean 0 and std 1 (pixel / 255, as the built-in digits benchmarks)
NORMALIZATIONS = ("imagenet", "data", "none")
# Budget of the decoded-image cache of image folders (uint8, all tasks together): 2 GiB holds
# e.g. Tiny-ImageNet's 110,000 images at 64x64 RGB (1.3 GiB), not at AlexNet's 224x224 (16 GiB).
DEFAULT_CACHE_MB = 2048
DECODE_THREADS = 8  # at most, and at most one per CPU
# PIL modes read as one channel; every other 8-bit mode (RGB, RGBA, CMYK, P, ...) counts as colour
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La"})
# 16-bit and float images: converting them to 8 bits would clip every value above 255
DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
Samples = list[tuple[str, int]]  # (image path, label) of one split


@dataclass(frozen=True)
class Preprocessing:
    """How the images of an image-folder sequence become model inputs.

    Each image is resized to ``image_size``² with ``channels`` channels (1: grayscale,
    3: RGB), mirrored left-right at random in training when ``augment`` is ``"flip"``, and
    normalised per channel c: x = (pixel / 255 − mean[c]) / std[c].
    """

    image_size: int
    channels: int
    augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) \
                or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive integer, not {self.image_size!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"channels must be 1 or 3, not {self.channels!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, not "
                             f"{self.augment!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not (isinstance(values, tuple) and len(values) == self.channels
                    and all(isinstance(v, float) and math.isfinite(v) for v in values)):
                raise ValueError(f"{name} must be {self.channels} finite floats (one per "
                                 f"channel), not {values!r}")
        if not all(v > 0 for v in self.std):
            raise ValueError(f"std must be positive, not {self.std!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that ``from_dict`` turns back into an equal ``Preprocessing``."""
        return {"image_size": self.image_size, "channels": self.channels,
                "augment": self.augment, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Any) -> Preprocessing:
        """The inverse of ``to_dict``; a ValueError naming the problem if ``d`` does not fit."""
        keys = ("image_size", "channels", "augment", "mean", "std")
        if not isinstance(d, dict) or sorted(d) != sorted(keys):
            found = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"preprocessing must be a dict with keys {', '.join(keys)}, "
                             f"not {found}")
        stats = {}
        for name in ("mean", "std"):
            values = d[name]
            if not isinstance(values, (list, tuple)) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"preprocessing {name} must be a list of numbers, not "
                                 f"{values!r}")
            stats[name] = tuple(float(v) for v in values)
        return cls(image_size=d["image_size"], channels=d["channels"], augment=d["augment"],
                   **stats)


class ImageFolderSplit(Dataset):
    """One split (train or test) of one task folder: labelled image files as model inputs.

    Each image is decoded, converted to ``preprocessing.channels`` channels and resized to
    ``image_size``² (bilinear) as uint8; these decoded images are kept in ``images`` when the
    run's cache holds them (else decoded again on every access). Per batch, the training split
    of a run with ``augment="flip"`` mirrors each image left-right with probability 1/2 (drawn
    from the global torch RNG, which the run's checkpoint restores), then every input is
    x = (pixel / 255 − mean_c) / std_c per channel c.
    """

    def __init__(self, samples: Samples, preprocessing: Preprocessing, train: bool,
                 images: torch.Tensor | None = None) -> None:
        self.samples = samples
        self.preprocessing = preprocessing
        self.flip = train and preprocessing.augment == "flip"
        self.images = images  # (N, C, S, S) uint8, or None: decode on access
        # (pixel / 255 - mean) / std as one multiply-add: pixel * scale + shift
        std = torch.tensor(preprocessing.std, dtype=torch.float64)
        mean = torch.tensor(preprocessing.mean, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std)).float().view(-1, 1, 1)
        self._shift = (-mean / std).float().view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def unaugmented(self) -> "ImageFolderSplit":
        """The same images as evaluation reads them: no random flip (the held-out part of a
        training split, e.g. ``--reg_lambda auto``'s validation split)."""
        view = copy.copy(self)
        view.flip = False
        return view

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        # DataLoader hands over a whole batch's indices: a few tensor operations per batch
        # instead of a transform pipeline per image
        p = self.preprocessing
        if self.images is not None:
            x = self.images[indices]
        else:
            x = torch.stack([_decode(self.samples[i][0], p.image_size, p.channels)
                             for i in indices])
        if self.flip:
            mirror = torch.rand(len(indices)) < 0.5
            x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x)
        x = torch.addcmul(self._shift, x.float(), self._scale)
        return [(image, self.samples[i][1]) for image, i in zip(x, indices)]


def _decode(path: str, size: int, channels: int | None) -> torch.Tensor:
    """One image file as a (C, size, size) uint8 tensor, resized as torchvision's
    ``Resize((size, size))`` resizes a PIL image (bilinear, antialiased). C is ``channels``:
    a grayscale image is repeated to three when it is 3, a colour one in a 1-channel run is an
    error (converting it would silently drop its colour); None keeps the image's own (1 for
    grayscale, 3 for colour)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode in DEEP_MODES:
                raise AppError(f"{path}: {image.mode} images (16-bit or float pixels) are not "
                               "supported; save them with 8 bits per channel")
            grey = image.mode in GRAYSCALE_MODES
            if channels == 1 and not grey:
                raise AppError(f"{path}: a colour image ({image.mode}) in a run whose images "
                               "are grayscale (1 channel)")
            image = image.convert("L" if grey else "RGB").resize((size, size), Image.BILINEAR)
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise AppError(f"{path}: cannot read image ({exc})") from None
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    if not grey:
        return pixels.permute(2, 0, 1).contiguous()
    return pixels.unsqueeze(0).expand(channels or 1, -1, -1).contiguous()


def _decode_all(samples: Samples, size: int, channels: int | None
                ) -> torch.Tensor:
    """The images of ``samples``, (N, C, size, size) uint8, decoded by a few threads (PIL
    releases the GIL while it decodes and resizes; each image is independent, so the result
    does not depend on the threads). C is ``channels``, or for None 3 if any image is in
    colour (grayscale ones repeated, as ``_decode`` does for ``channels=3``), else 1."""
    threads = max(1, min(DECODE_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        decoded = list(pool.map(lambda sample: _decode(sample[0], size, channels), samples))
    c = channels or max((x.shape[0] for x in decoded), default=1)
    images = torch.empty((len(decoded), c, size, size), dtype=torch.uint8)
    for i, x in enumerate(decoded):
        images[i] = x  # (1, S, S) broadcasts to (3, S, S)
    return images


def _is_colour(path: str) -> bool:
    """Whether the image file holds colour (read from its header, without decoding)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.mode not in GRAYSCALE_MODES
    except (OSError, ValueError) as exc:
        raise AppError(f"{path}: cannot read image ({exc})") from None


def _channel_stats(images: Iterable[torch.Tensor], channels: int
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of pixel / 255 over uint8 image
    batches of shape (N, C, H, W), accumulated in float64."""
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for batch in images:
        x = batch.to(torch.float64).div_(255.0).transpose(0, 1).reshape(channels, -1)
        total += x.sum(dim=1)
        squares += x.square().sum(dim=1)
        count += x.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_(min=0.0).sqrt_()
    # a constant channel carries no information; dividing by 1 keeps it finite
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def _batches(samples: Samples, channels: int, size: int,
             images: torch.Tensor | None, chunk: int = 256) -> Iterator[torch.Tensor]:
    for start in range(0, len(samples), chunk):
        if images is not None:
            yield images[start:start + chunk]
        else:
            yield _decode_all(samples[start:start + chunk], size, channels)


def _class_names(split_dir: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        names = [c for c in find_classes(split_dir)[0] if not c.startswith(".")]
    except FileNotFoundError:
        names = []
    if not names:
        raise AppError(f"{split_dir}: no class folders (ImageFolder layout: {split_dir}/<class>/"
                       "<image>)")
    return names


def _split_samples(split_dir: Path, names: list[str], index: dict[str, int]
                   ) -> Samples:
    """(path, label) of every image under ``split_dir/<name>/`` (torchvision's scan: sorted,
    sub-folders included), every named class folder holding at least one image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    samples = make_dataset(split_dir, {name: index[name] for name in names},
                           extensions=IMG_EXTENSIONS, allow_empty=True)
    found = {label for _, label in samples}
    for name in names:
        if index[name] not in found:
            raise AppError(f"{split_dir / name}: class folder without images "
                           f"({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    return samples


def _scan(task_dir: Path) -> tuple[list[str], Samples, Samples]:
    """A task folder's class names (label = position, from train/) and its train and test
    (path, label) lists."""
    for split in ("train", "test"):
        if not (task_dir / split).is_dir():
            raise AppError(f"{task_dir}: no {split}/ folder (each task folder needs train/ "
                           "and test/)")
    classes = _class_names(task_dir / "train")
    index = {name: i for i, name in enumerate(classes)}
    test_names = _class_names(task_dir / "test")
    for name in test_names:  # a test split may lack a class, never add one
        if name not in index:
            raise AppError(f"{task_dir / 'test' / name}: class not in {task_dir / 'train'}")
    return (classes, _split_samples(task_dir / "train", classes, index),
            _split_samples(task_dir / "test", test_names, index))


def _check_options(arch: str, augment: str | None, normalize: str | None,
                   cache_mb: float) -> None:
    if arch not in ("alexnet", "cnn", "mlp"):
        raise ValueError(f"arch must be alexnet, cnn or mlp, not {arch!r}")
    if augment is not None and augment not in AUGMENTS:
        raise AppError(f"--augment {augment}: use one of {', '.join(AUGMENTS)}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise AppError(f"--normalize {normalize}: use one of {', '.join(NORMALIZATIONS)}")
    if not (math.isfinite(cache_mb) and cache_mb >= 0):
        raise AppError(f"--cache_mb {cache_mb}: must be a number >= 0 (0 turns the cache off)")


def task_dirs(data_dir: str) -> list[Path]:
    """The task folders of ``data_dir`` in sorted order (hidden ones skipped); AppError if
    there is no such folder or it holds none."""
    root = Path(data_dir)
    if not root.is_dir():
        raise AppError(f"--data_dir {root}: no such folder")
    found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise AppError(f"--data_dir {root}: no task folders (expected {root}/<task>/train/ and "
                       f"{root}/<task>/test/)")
    return found


def image_side(data_dir: str) -> int:
    """The larger side, in pixels, of the first training image of the first task (read from
    its header): how large the sequence's images are, before any --image_size resize."""
    from PIL import Image

    _, train, _ = _scan(task_dirs(data_dir)[0])
    path = train[0][0]
    try:
        with Image.open(path) as image:
            return max(image.size)
    except (OSError, ValueError) as exc:
        raise AppError(f"{path}: cannot read image ({exc})") from None


def _resumed(stored: Any, image_size: int, augment: str | None) -> Preprocessing:
    """The preprocessing stored with the run being resumed, checked against the flags."""
    try:
        known = Preprocessing.from_dict(stored)
    except ValueError as exc:
        raise AppError(f"the stored preprocessing does not fit: {exc}") from None
    if known.image_size != image_size or augment not in (None, known.augment):
        raise AppError(f"--resume: the run was started with --image_size "
                       f"{known.image_size} and --augment {known.augment}")
    return known


def _decoded(splits: list[Samples], size: int, channels: int | None, cache_mb: float,
             log: Callable[[str], None]) -> tuple[list[torch.Tensor | None], int]:
    """Every split's images decoded as uint8 when they fit ``cache_mb`` (else None each: decode
    on access, and ``log`` says so), and the channels (``channels``, or for None 3 if any image
    is in colour, else 1)."""
    def megabytes(c: int) -> float:
        return sum(map(len, splits)) * c * size ** 2 / 2 ** 20

    images: list[torch.Tensor | None] = [None] * len(splits)
    if 0 < megabytes(channels or 1) <= cache_mb:
        # decoding everything also tells the channels, without a separate pass over the files
        decoded = [_decode_all(samples, size, channels) for samples in splits]
        channels = channels or max(x.shape[1] for x in decoded)
        if megabytes(channels) <= cache_mb:
            images = [x.expand(-1, channels, -1, -1).contiguous() for x in decoded]
        del decoded
    if cache_mb > 0 and images[0] is None:
        log(f"note: the decoded images need {megabytes(channels or 1):.0f} MB, more than "
            f"--cache_mb {cache_mb:g}: every image is decoded again on every access (slower; "
            "raise --cache_mb to keep them in memory)")
    if channels is None:
        channels = 3 if any(_is_colour(path) for samples in splits for path, _ in samples) else 1
    return images, channels


def _statistics(normalize: str, channels: int, first: Samples, size: int,
                images: torch.Tensor | None, root: str
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the inputs for ``normalize`` (``first``: the first task's
    training split, for ``"data"``)."""
    if normalize == "imagenet":
        if channels != 3:
            raise AppError("--normalize imagenet: ImageNet's statistics are for RGB images, "
                           f"and the images in {root} are grayscale (use data or none)")
        return IMAGENET_MEAN, IMAGENET_STD
    if normalize == "none":
        return (0.0,) * channels, (1.0,) * channels
    return _channel_stats(_batches(first, channels, size, images), channels)


def image_folder_tasks(data_dir: str, image_size: int, *, arch: str = "alexnet",
                       augment: str | None = None, stored: dict | None = None,
                       cache_mb: float = DEFAULT_CACHE_MB, normalize: str | None = None,
                       log: Callable[[str], None] = print) -> list[Task]:
    """The original layout: ``data_dir/<task>/{train,test}/<class>/<image>``, tasks in sorted
    order, preprocessed as the data and the backbone need (``Task.preprocessing``):

    * channels: 3 for ``arch="alexnet"`` or when any image is in colour, else 1 (a grayscale
      sequence stays grayscale);
    * ``augment``: ``"flip"`` (random left-right mirror of training images) or ``"none"``;
      None means ``"flip"`` for alexnet (as the original) and ``"none"`` otherwise (a mirrored
      digit is another shape);
    * ``normalize``: ``"imagenet"`` (ImageNet's statistics, what pretrained AlexNet expects),
      ``"data"`` (the per-channel mean and standard deviation of the first task's training
      images, after resizing) or ``"none"`` (pixel / 255); None means ``"imagenet"`` for
      alexnet and ``"none"`` otherwise (centring digits with their own statistics made every
      background pixel non-zero, and cost 3-6 points against the built-in digit benchmarks).

    ``stored`` (``Preprocessing.to_dict()`` of the run being resumed) gives channels, augment,
    mean and std instead (``normalize`` is then not used), so a resumed run preprocesses exactly
    as it started. The decoded, resized images of all tasks are kept in memory as uint8 when
    they fit in ``cache_mb`` megabytes (0: never); otherwise each image is decoded on every
    access, and ``log`` says so. Unreadable images are reported (naming the file) here when
    cached, else when accessed.
    """
    _check_options(arch, augment, normalize, cache_mb)
    folders = task_dirs(data_dir)
    scanned = [_scan(d) for d in folders]
    splits = [samples for _, train, test in scanned for samples in (train, test)]
    known = None if stored is None else _resumed(stored, image_size, augment)
    channels = known.channels if known else (3 if arch == "alexnet" else None)
    images, channels = _decoded(splits, image_size, channels, cache_mb, log)
    if known is None:
        mean, std = _statistics(normalize or ("imagenet" if arch == "alexnet" else "none"),
                                channels, splits[0], image_size, images[0], data_dir)
        known = Preprocessing(image_size=image_size, channels=channels,
                              augment=augment or ("flip" if arch == "alexnet" else "none"),
                              mean=tuple(mean), std=tuple(std))
    return [Task(folder.name, classes,
                 ImageFolderSplit(train, known, train=True, images=images[2 * k]),
                 ImageFolderSplit(test, known, train=False, images=images[2 * k + 1]),
                 preprocessing=known)
            for k, (folder, (classes, train, test)) in enumerate(zip(folders, scanned))]
