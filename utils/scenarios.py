"""``--scenario``: the three continual-learning scenarios of van de Ven & Tolias (2019) and Hsu
et al. (2018), and what each means for the head, the labels and the accuracy matrix.

* ``task``: one head per task; the task's identity picks the head in training and at test.
  ``acc_matrix[i][j]``: accuracy on task j's test set with task j's own head, among task j's
  classes.
* ``domain``: one head shared by all tasks (as many outputs as each task has classes); a
  sample's label is its class's position within its task, and no task identity is used in
  training or at test. ``acc_matrix[i][j]``: accuracy on task j's test set with the shared head
  after task i.
* ``class``: one head over the union of the classes seen so far, in order of first appearance
  (a class name shared by two tasks is one class), gaining rows as tasks bring new classes; a
  sample's label is its class's position in that union, and no task identity is used at test.
  ``acc_matrix[i][j]``: accuracy on task j's test set after task i, the prediction being the
  argmax over *every* class of tasks 0..i (the "active outputs" of van de Ven & Tolias).

In the two single-head scenarios the head is shared by every task, so it is regularised like
the backbone (its reg_params entry grows with it under ``class``: ``mas_optim.grow_reg_params``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from utils import AppError
from utils.data import Task

SCENARIOS = ("task", "domain", "class")
DESCRIPTIONS = {
    "task": "task-incremental: one head per task, the task's identity given at test",
    "domain": "domain-incremental: one head shared by every task, no task identity in training "
              "or at test",
    "class": "class-incremental: one head over every class seen so far, no task identity at "
             "test (accuracy among all of those classes)",
}


def shared_head(scenario: str) -> bool:
    """Whether one head serves every task (and is then regularised like the backbone)."""
    return scenario != "task"


def head_classes(scenario: str, classes: list[list[str]], t: int) -> list[str]:
    """The class names of the head's outputs while task ``t`` is trained (``classes``: each
    task's class names, as ``Task.classes``)."""
    if scenario != "class":
        return classes[t]
    union: list[str] = []
    for names in classes[:t + 1]:
        union += [name for name in names if name not in union]
    return union


def check_scenario(scenario: str, tasks: list[Task]) -> None:
    """A domain-incremental run needs tasks of as many classes each (one shared head)."""
    if scenario not in SCENARIOS:  # a stored config is never seen by argparse
        raise AppError(f"--scenario {scenario}: unknown (choose from {', '.join(SCENARIOS)})")
    counts = [len(task.classes) for task in tasks]
    if scenario == "domain" and len(set(counts)) > 1:
        odd = next(task for task in tasks if len(task.classes) != counts[0])
        raise AppError(f"--scenario domain shares one head of {counts[0]} outputs (the classes "
                       f"of {tasks[0].name}), but {odd.name} has {len(odd.classes)} classes: "
                       "give every task as many classes, or use --scenario class or task")


class Relabeled(Dataset):
    """``dataset`` with each label y replaced by ``labels[y]`` (inputs untouched)."""

    def __init__(self, dataset: Dataset, labels: list[int]) -> None:
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        x, y = self.dataset[i]
        return x, self.labels[int(y)]

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, int]]:
        # keeps a dataset's own batched reading (ImageFolderSplit decodes a batch at once)
        many = getattr(self.dataset, "__getitems__", None)
        items = many(indices) if many else [self.dataset[i] for i in indices]
        return [(x, self.labels[int(y)]) for x, y in items]


def scenario_tasks(scenario: str, tasks: list[Task]) -> list[Task]:
    """The tasks with the labels the scenario trains and tests on: under ``class`` each task's
    labels become positions in the union of the classes so far; otherwise unchanged."""
    check_scenario(scenario, tasks)
    if scenario != "class":
        return tasks
    union = head_classes("class", [task.classes for task in tasks], len(tasks) - 1)
    relabeled = []
    for task in tasks:
        labels = [union.index(name) for name in task.classes]
        relabeled.append(replace(task, train=Relabeled(task.train, labels),
                                 test=Relabeled(task.test, labels)))
    return relabeled


@torch.no_grad()
def carry_head(head: nn.Linear, previous: dict[str, torch.Tensor]) -> None:
    """Copy the previous task's head (``head.weight``, ``head.bias``) into ``head``'s first rows:
    all of them under ``domain``, the old classes' rows under ``class`` (the new rows keep their
    fresh initialisation). ValueError if the previous head does not fit."""
    for key, param in (("head.weight", head.weight), ("head.bias", head.bias)):
        old = previous.get(key)
        if old is None or old.dim() != param.dim() or old.shape[0] > param.shape[0] \
                or old.shape[1:] != param.shape[1:]:
            found = None if old is None else tuple(old.shape)
            raise ValueError(f"the previous head's {key} is {found}, the head "
                             f"{tuple(param.shape)}")
        param[:old.shape[0]] = old.to(param)
