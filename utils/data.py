"""Task sequences: Split/Permuted Digits (bundled with scikit-learn), Split MNIST, image folders.

Every task is a classification problem with its own label space (0..C-1) and its own head
(the task-incremental setting of MAS, Aljundi et al. 2018, Sec. 5). Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from utils import AppError

BENCHMARKS = ("split-digits", "permuted-digits", "split-mnist")
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0  # the train/test split is fixed: it is part of the benchmark, not of --seed
NUM_PERMUTED_TASKS = 5
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # split-mnist's inputs: (pixel / 255 - mean) / std
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
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


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


# --- image folders -----------------------------------------------------------------------------
class ImageFolderSplit(Dataset):
    """One split (train or test) of one task folder: labelled image files as model inputs.

    Each image is decoded, converted to ``preprocessing.channels`` channels and resized to
    ``image_size``² (bilinear) as uint8; these decoded images are kept in ``images`` when the
    run's cache holds them (else decoded again on every access). Per batch, the training split
    of a run with ``augment="flip"`` mirrors each image left-right with probability 1/2 (drawn
    from the global torch RNG, which the run's checkpoint restores), then every input is
    x = (pixel / 255 − mean_c) / std_c per channel c.
    """

    def __init__(self, samples: list[tuple[str, int]], preprocessing: Preprocessing, train: bool,
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


def _decode_all(samples: list[tuple[str, int]], size: int, channels: int | None
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


def _batches(samples: list[tuple[str, int]], channels: int, size: int,
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
                   ) -> list[tuple[str, int]]:
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


def _scan(task_dir: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
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
    mean and std instead (``normalize`` is then not used), so a resumed run preprocesses exactly as it started. The decoded,
    resized images of all tasks are kept in memory as uint8 when they fit in ``cache_mb``
    megabytes (0: never); otherwise each image is decoded on every access, and ``log`` says so.
    Unreadable images are reported (naming the file) here when cached, else when accessed.
    """
    if arch not in ("alexnet", "cnn", "mlp"):
        raise ValueError(f"arch must be alexnet, cnn or mlp, not {arch!r}")
    if augment is not None and augment not in AUGMENTS:
        raise AppError(f"--augment {augment}: use one of {', '.join(AUGMENTS)}")
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise AppError(f"--normalize {normalize}: use one of {', '.join(NORMALIZATIONS)}")
    if not (math.isfinite(cache_mb) and cache_mb >= 0):
        raise AppError(f"--cache_mb {cache_mb}: must be a number >= 0 (0 turns the cache off)")
    root = Path(data_dir)
    if not root.is_dir():
        raise AppError(f"--data_dir {root}: no such folder")
    task_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not task_dirs:
        raise AppError(f"--data_dir {root}: no task folders (expected {root}/<task>/train/ and "
                       f"{root}/<task>/test/)")
    scanned = [_scan(d) for d in task_dirs]
    splits = [samples for _, train, test in scanned for samples in (train, test)]

    known: Preprocessing | None = None
    channels: int | None = None  # None: from the images (3 if any is in colour)
    if stored is not None:
        try:
            known = Preprocessing.from_dict(stored)
        except ValueError as exc:
            raise AppError(f"the stored preprocessing does not fit: {exc}") from None
        if known.image_size != image_size or augment not in (None, known.augment):
            raise AppError(f"--resume: the run was started with --image_size "
                           f"{known.image_size} and --augment {known.augment}")
        channels = known.channels
    elif arch == "alexnet":
        channels = 3

    def megabytes(c: int) -> float:
        return sum(map(len, splits)) * c * image_size ** 2 / 2 ** 20

    images: list[torch.Tensor | None] = [None] * len(splits)
    if 0 < megabytes(channels or 1) <= cache_mb:
        # decoding everything also tells the channels, without a separate pass over the files
        decoded = [_decode_all(samples, image_size, channels) for samples in splits]
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

    if known is None:
        normalize = normalize or ("imagenet" if arch == "alexnet" else "none")
        if normalize == "imagenet":
            if channels != 3:
                raise AppError("--normalize imagenet: ImageNet's statistics are for RGB images, "
                               f"and the images in {root} are grayscale (use data or none)")
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        elif normalize == "none":
            mean, std = (0.0,) * channels, (1.0,) * channels
        else:
            mean, std = _channel_stats(_batches(splits[0], channels, image_size, images[0]),
                                       channels)
        known = Preprocessing(image_size=image_size, channels=channels,
                              augment=augment or ("flip" if arch == "alexnet" else "none"),
                              mean=tuple(mean), std=tuple(std))
    return [Task(task_dir.name, classes,
                 ImageFolderSplit(train, known, train=True, images=images[2 * k]),
                 ImageFolderSplit(test, known, train=False, images=images[2 * k + 1]),
                 preprocessing=known)
            for k, (task_dir, (classes, train, test)) in enumerate(zip(task_dirs, scanned))]


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
