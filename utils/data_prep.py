"""Split an already downloaded Tiny-ImageNet into the original repository's task folders.

    python utils/data_prep.py [--source tiny-imagenet-200] [--dest data/tiny-imagenet-tasks]

The 200 classes are shuffled with --seed and dealt into --num_tasks tasks (4 of 50 classes by
default, as the original). Each task gets ``train/<wnid>/`` (the class's 500 training images)
and ``test/<wnid>/`` (its 50 validation images, filed by ``val/val_annotations.txt``; the
official test split has no labels). Files are hard-linked when possible, else copied. Nothing
is downloaded: without the unzipped archive the script says where to put it and exits with 2.

The result is built in ``<dest>.partial`` and renamed to ``<dest>`` only when complete, so an
interrupted run never leaves a half-filled folder that train.py would take for real data.
Standalone on purpose (standard library only), so it runs as a plain script.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

ARCHIVE_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class PrepError(Exception):
    """Missing or malformed input: reported as one line, exit code 2."""


def read_layout(source: Path) -> tuple[list[str], dict[str, list[Path]], dict[str, list[Path]]]:
    """Class ids, training images per class and validation images per class."""
    wnids_file = source.resolve() / "wnids.txt"
    if not wnids_file.is_file():
        raise PrepError(
            f"{source.resolve()}/ not found or incomplete (no wnids.txt). Download {ARCHIVE_URL} on a "
            f"machine with network access, unzip it so that {wnids_file} exists, and run this "
            "again (or point --source at the unzipped tiny-imagenet-200/ folder)")
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    train: dict[str, list[Path]] = {}
    for wnid in wnids:
        images = sorted((source / "train" / wnid / "images").glob("*.JPEG"))
        if not images:
            raise PrepError(f"{source / 'train' / wnid / 'images'}: no .JPEG images")
        train[wnid] = images
    annotations = source / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise PrepError(f"{annotations}: missing (needed to file the validation images)")
    val: dict[str, list[Path]] = {w: [] for w in wnids}
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in val:
            raise PrepError(f"{annotations}:{number}: not '<image>\\t<wnid>...' with a known wnid")
        image = source / "val" / "images" / fields[0]
        if not image.is_file():
            raise PrepError(f"{image}: listed in {annotations.name} but missing")
        val[fields[1]].append(image)
    for wnid, images in val.items():
        if not images:
            raise PrepError(f"{annotations}: no validation images for class {wnid}")
    return wnids, train, val


def deal_classes(wnids: list[str], num_tasks: int, seed: int) -> list[list[str]]:
    """Shuffle the classes with ``seed`` and deal them into ``num_tasks`` near-equal tasks."""
    if not 1 <= num_tasks <= len(wnids):
        raise PrepError(f"--num_tasks {num_tasks}: must be between 1 and {len(wnids)}")
    order = list(wnids)
    random.Random(seed).shuffle(order)
    size, extra = divmod(len(order), num_tasks)
    tasks, start = [], 0
    for k in range(num_tasks):
        end = start + size + (1 if k < extra else 0)
        tasks.append(sorted(order[start:end]))
        start = end
    return tasks


def _place(image: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / image.name
    try:
        os.link(image, target)
    except OSError:
        shutil.copy2(image, target)


def prepare(source: Path, dest: Path, num_tasks: int = 4, seed: int = 0) -> list[list[str]]:
    """Build ``dest/Task_k/{train,test}/<wnid>/``; return the classes of each task."""
    if dest.exists():
        raise PrepError(f"{dest}: already exists (remove it or choose another --dest)")
    wnids, train, val = read_layout(source)
    tasks = deal_classes(wnids, num_tasks, seed)
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    width = len(str(num_tasks))
    for k, classes in enumerate(tasks, 1):
        task_dir = partial / f"Task_{k:0{width}d}"
        for wnid in classes:
            for image in train[wnid]:
                _place(image, task_dir / "train" / wnid)
            for image in val[wnid]:
                _place(image, task_dir / "test" / wnid)
    partial.rename(dest)
    return tasks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="tiny-imagenet-200",
                   help="the unzipped tiny-imagenet-200/ folder (default ./tiny-imagenet-200)")
    p.add_argument("--dest", default="data/tiny-imagenet-tasks",
                   help="output folder, one sub-folder per task (default data/tiny-imagenet-tasks)"
                        "; use it as train.py --data_dir")
    p.add_argument("--num_tasks", type=int, default=4, help="number of tasks (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the class split (default 0)")
    args = p.parse_args(argv)
    try:
        tasks = prepare(Path(args.source), Path(args.dest), args.num_tasks, args.seed)
    except PrepError as exc:
        print(f"data_prep.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(tasks)} tasks of {', '.join(str(len(t)) for t in tasks)} classes in "
          f"{args.dest}/; train with: python train.py --data_dir {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
