"""Shared fixtures: finished and interrupted runs, image folders, a machine without the C
kernels."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import FAST, make_image_tasks, run_cli, run_main
from mas_optim import _kernels


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


@pytest.fixture
def no_c_kernels(monkeypatch):
    """As on a machine without a C compiler: mas_optim._kernels.load() gives None."""
    monkeypatch.setattr(_kernels, "load", lambda: None)
    monkeypatch.setattr(_kernels, "reason", lambda: "no C compiler (cc) on PATH")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the C kernels' calls by name ('sgd', 'penalty', 'adam'): tensors per call."""
    kernels = _kernels.load()
    if kernels is None:
        pytest.skip(f"the C kernels are not available here: {_kernels.reason()}")
    calls = {"sgd": [], "penalty": [], "adam": []}
    for name in calls:
        real = getattr(kernels, name)

        def spy(dtype, rows, *args, _real=real, _name=name):
            calls[_name].append(len(rows[0]))
            return _real(dtype, rows, *args)

        monkeypatch.setattr(kernels, name, spy)
    return calls


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
