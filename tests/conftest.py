"""Shared fixtures: finished and interrupted runs, image folders; under CI, no skip for a
missing framework."""
from __future__ import annotations

import os
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


def _missing_extra(report) -> bool:
    """A skip for a module that could not be imported (``pytest.importorskip``)."""
    return report.skipped and "could not import" in str(report.longrepr)


# Under CI (CI=true, as .ci/run is run) the test extra installs every framework: a test
# skipped for a missing one would hide a broken install, so it fails instead.
@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and _missing_extra(report):
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and _missing_extra(report):
        report.outcome = "failed"
