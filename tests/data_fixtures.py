"""Image-folder task sequences written as PNG files, for the data-pipeline tests.

``write_digit_folders`` writes the very images of the built-in Split/Permuted Digits benchmarks
(scikit-learn's 8x8 digits) as grayscale PNGs in ``--data_dir`` layout, so a folder run and a
``--benchmark`` run can be compared on the same data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def write_digit_folders(root: Path, benchmark: str = "split-digits", size: int = 8,
                        num_tasks: int | None = None) -> Path:
    """``root/task_<k>/{train,test}/<class>/<i>.png``: the tasks of ``benchmark``
    ("split-digits" or "permuted-digits") as 8-bit grayscale PNGs (pixel = round(255 · x) of the
    benchmark's x in [0, 1]), resized to ``size``² (bilinear) when it is not 8."""
    from PIL import Image

    from utils.data import permuted_digits, split_digits

    tasks = split_digits() if benchmark == "split-digits" else permuted_digits()
    for k, task in enumerate(tasks[:num_tasks]):
        for split, data in (("train", task.train), ("test", task.test)):
            x, y = data.tensors
            pixels = (x[:, 0] * 255).round().to(torch.uint8).numpy()
            for i, (image, label) in enumerate(zip(pixels, y.tolist())):
                folder = root / f"task_{k + 1}" / split / task.classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                png = Image.fromarray(image, mode="L")
                if size != image.shape[0]:
                    png = png.resize((size, size), Image.BILINEAR)
                png.save(folder / f"{i:04d}.png")
    return root


def write_png_tasks(root: Path, mode: str = "L", n_tasks: int = 2,
                    classes: tuple[str, ...] = ("a", "b"), per_class: int = 4, size: int = 6,
                    seed: int = 0) -> Path:
    """``root/task_k/{train,test}/<class>/<i>.png`` of random pixels in PIL ``mode`` ("L" or
    "RGB"), brighter for odd classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for t in range(n_tasks):
        for split in ("train", "test"):
            for c, name in enumerate(classes):
                folder = root / f"task_{t}" / split / name
                folder.mkdir(parents=True)
                for i in range(per_class):
                    pixels = rng.integers(0, 120, shape) + 120 * (c % 2)
                    Image.fromarray(pixels.astype(np.uint8), mode=mode).save(folder / f"{i}.png")
    return root
