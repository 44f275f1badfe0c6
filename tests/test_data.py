"""Task data: Split/Permuted Digits, image folders, MNIST idx files, loaders and seeds."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import make_image_tasks, write_mnist

from utils import AppError
from utils.data import (derived_seed, make_loader, permuted_digits, split_digits, split_mnist,
                        train_shard)
from utils.folders import image_folder_tasks


def test_split_digits_five_binary_tasks_with_a_fixed_split():
    tasks = split_digits()
    assert [t.classes for t in tasks] == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"],
                                          ["8", "9"]]
    assert sum(len(t.train) + len(t.test) for t in tasks) == 1797
    for task in tasks:
        assert task.input_shape == (1, 8, 8)
        labels = task.train.tensors[1]
        assert set(labels.tolist()) == {0, 1}
        assert 0.0 <= float(task.train.tensors[0].min()) and float(task.train.tensors[0].max()) <= 1
    again = split_digits()
    assert torch.equal(again[2].test.tensors[0], tasks[2].test.tensors[0])


def test_permuted_digits_permutes_pixels_per_task():
    tasks = permuted_digits()
    assert len(tasks) == 5 and all(t.classes == [str(d) for d in range(10)] for t in tasks)
    first, second = tasks[0].train.tensors[0], tasks[1].train.tensors[0]
    assert not torch.equal(first, second)
    # the same pixels, moved: sorted intensities of every image agree
    assert torch.equal(first.flatten(1).sort(dim=1).values, second.flatten(1).sort(dim=1).values)
    assert torch.equal(tasks[0].train.tensors[1], tasks[3].train.tensors[1])
    digits0 = split_digits()[0].train.tensors[0]
    assert any(torch.equal(digits0[0], img) for img in first)  # task 1 is unpermuted


def test_derived_seed_is_pure_and_distinct():
    assert derived_seed(0, 1, 2) == derived_seed(0, 1, 2)
    seeds = {derived_seed(s, t, e) for s in range(3) for t in range(3) for e in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2 ** 63 for s in seeds)


def test_loader_order_depends_only_on_its_seed_and_spares_the_global_rng():
    task = split_digits()[0]
    order = lambda seed: torch.cat([y for _, y in make_loader(task.train, 16, seed)])  # noqa
    torch.manual_seed(1)
    before = torch.get_rng_state()
    a = order(7)
    fixed = torch.cat([y for _, y in make_loader(task.train, 16)])
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, order(7)) and not torch.equal(a, order(8))
    assert torch.equal(fixed, task.train.tensors[1])


def test_image_folder_tasks_layout_and_labels(tmp_path):
    data = make_image_tasks(tmp_path / "d", classes=("cat", "dog", "emu"), per_class=2)
    (data / ".hidden").mkdir()
    for image in (data / "task_1" / "test" / "dog").iterdir():
        image.unlink()
    (data / "task_1" / "test" / "dog").rmdir()  # a test split may lack a class
    tasks = image_folder_tasks(str(data), 10)
    assert [t.name for t in tasks] == ["task_0", "task_1"]
    assert tasks[1].classes == ["cat", "dog", "emu"]
    assert tasks[0].input_shape == (3, 10, 10)
    assert sorted({y for _, y in tasks[1].test.samples}) == [0, 2]  # emu keeps label 2
    assert [y for _, y in tasks[1].test] == [0, 0, 2, 2]
    assert len(tasks[0].train) == 6


def test_split_mnist_reads_idx_files(tmp_path):
    tasks = split_mnist(str(write_mnist(tmp_path)))
    assert len(tasks) == 5 and tasks[4].classes == ["8", "9"]
    assert tasks[0].input_shape == (1, 28, 28)
    assert set(tasks[0].train.tensors[1].tolist()) == {0, 1}


def test_split_mnist_missing(tmp_path):
    with pytest.raises(AppError, match="MNIST not found"):
        split_mnist(str(tmp_path))
    with pytest.raises(AppError, match="--mnist_root"):
        split_mnist(None)


def test_train_shard_one_step_over_ranks_is_one_single_process_batch():
    data = TensorDataset(torch.arange(23))
    single = [b[0].tolist() for b in train_shard(data, 4, 11, 0, 1)]
    shards = [[b[0].tolist() for b in train_shard(data, 4, 11, r, 2)] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6  # 23 padded to 24, 12 per rank, batches of 2
    steps = [sorted(shards[0][i] + shards[1][i]) for i in range(6)]
    assert steps[:5] == [sorted(b) for b in single[:5]]
    assert steps[5] == sorted(single[5] + single[0][:1])  # padded with the order's start
    assert sorted(sum(single, [])) == list(range(23))


def test_train_shard_order_is_a_function_of_its_seed():
    data = TensorDataset(torch.arange(50))
    order = lambda seed, r: [b[0].tolist() for b in train_shard(data, 8, seed, r, 3)]  # noqa
    assert order(5, 1) == order(5, 1) and order(5, 1) != order(6, 1)
    assert [len(order(5, r)) for r in range(3)] == [6, 6, 6]  # 17 per rank in batches of 3
