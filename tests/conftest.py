"""Shared fixtures of the application tests: finished and interrupted runs, image folders."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FAST, make_image_tasks, run_cli, run_main


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """A finished FAST Split Digits run (read it, copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "m"
    assert run_main(FAST, out) == 0
    return out


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory) -> Path:
    """A FAST run killed right after task 2 was committed, so a resume would write files
    (copy it before changing it)."""
    out = tmp_path_factory.mktemp("stopped") / "m"
    done = run_cli(FAST, out, env={"MAS_OPTIM_KILL_AT": "after-task:2"})
    assert done.returncode == -9, done.stderr
    return out


@pytest.fixture
def image_folders(tmp_path) -> Path:
    """Two tasks of two classes of 12x12 colour PNGs in the original's folder layout."""
    return make_image_tasks(tmp_path / "data")
