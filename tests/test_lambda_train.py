"""train.py's --reg_lambda auto (De Lange et al.'s protocol per task) and λ sweeps
(--reg_lambda V1 V2 ...: one run per value in one process, sweep.json, sweep.png, resume)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import ROOT, ctrl_c_then_resume, results, run_main, snapshot

# A sweep small enough for the suite: 5 tasks x 1 epoch, an MLP of width 8.
SMALL = ["--num_epochs", "1", "--hidden", "8"]
VALUES = ["0", "3"]
# docs/lambda.md, "The tests' band": split-digits with these flags. The best point of the grid
# --reg_lambda 0 1 10 100 1000 was lambda 1 for seeds 0-2 (seed 0: 95.53%); auto with its
# defaults ended 1.30, 1.10 and -0.19 points below each seed's best (seed 2: above it).
AUTO_SETTING = ["--num_epochs", "3", "--hidden", "64"]
BEST_GRID_ACC = 95.53
BAND_PP = 2.5  # the worst of the three seeds (1.30) and room for another CPU's rounding
FIT_FIRST = ["--auto_fit", "first"]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "m"
    assert run_main([*SMALL, "--reg_lambda", *VALUES], out) == 0
    return out


def test_sweep_writes_one_run_per_value_and_sweep_json(sweep_run):
    rows = json.loads((sweep_run / "sweep.json").read_text())
    assert [r["reg_lambda"] for r in rows] == [0.0, 3.0]
    for row, value in zip(rows, VALUES):
        doc = results(sweep_run / f"lambda_{value}")
        assert doc["config"]["reg_lambda"] == float(value)
        assert row == {"reg_lambda": float(value), "avg_acc": doc["avg_acc"],
                       "avg_forgetting": doc["avg_forgetting"]}
        assert (sweep_run / f"lambda_{value}" / "reg_params.pickle").is_file()
    assert (sweep_run / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_each_run_of_a_sweep_equals_the_single_run(tmp_path, sweep_run):
    assert run_main([*SMALL, "--reg_lambda", "3"], tmp_path / "one") == 0
    assert snapshot(tmp_path / "one") == snapshot(sweep_run / "lambda_3")


def test_sweep_killed_in_its_second_run_resumes_to_the_same_files(tmp_path, sweep_run, capsys):
    out = tmp_path / "m"
    env = {"MAS_OPTIM_KILL_AT": "after-task:7"}  # one count over the sweep: run 2, task 2
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, "--reg_lambda", *VALUES,
           "--output_dir", str(out)]
    done = subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert len(json.loads((out / "sweep.json").read_text())) == 1
    assert run_main(["--resume"], out) == 0
    assert "lambda_0/, lambda_3/" in capsys.readouterr().out
    assert snapshot(out) == snapshot(sweep_run)


def test_ctrl_c_in_a_sweep_names_the_command_that_finishes_the_sweep(tmp_path, sweep_run):
    """SIGINT in the sweep's second run: exit 130 and one line; its command ends the sweep with
    the files of an uninterrupted one."""
    import time

    out = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *SMALL, "--reg_lambda",
                             *VALUES, "--output_dir", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "lambda_3" / "checkpoint.pth").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ctrl_c_then_resume(proc, out)
    assert snapshot(out) == snapshot(sweep_run)


def test_overwrite_replaces_the_sweep_and_removes_its_runs(tmp_path, sweep_run):
    out = tmp_path / "m"
    shutil.copytree(sweep_run, out)
    assert run_main([*SMALL, "--reg_lambda", "3", "30", "--overwrite"], out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "lambda_3", "lambda_30", "sweep.json", "sweep.png", "sweep_plan.json"]
    assert snapshot(out / "lambda_3") == snapshot(sweep_run / "lambda_3")


def test_resume_of_a_finished_sweep_changes_nothing(tmp_path, sweep_run):
    out = tmp_path / "m"
    shutil.copytree(sweep_run, out)
    assert run_main(["--resume", "--reg_lambda", *VALUES], out) == 0
    assert snapshot(out) == snapshot(sweep_run)


@pytest.mark.parametrize("args, needle", [
    (["--reg_lambda", "auto", "1"], "give it alone"),
    (["--reg_lambda", "1", "-2"], "must be >= 0"),
    (["--reg_lambda", "1", "x"], "neither a number nor 'auto'"),
    (["--reg_lambda", "1", "1.0"], "given twice"),
    (["--auto_margin", "0.1"], "--auto_margin applies to --reg_lambda auto only"),
    (["--reg_lambda", "auto", "--auto_margin", "1"], "must be in [0, 1)"),
    (["--reg_lambda", "auto", "--auto_factor", "1.5"], "must be in (0, 1)"),
    (["--reg_lambda", "auto", "--auto_val_fraction", "0"], "must be in (0, 1)"),
    (["--reg_lambda", "auto", "--auto_fit", "last"], "--auto_fit"),
    (["--method", "finetune", "--reg_lambda", "0", "1"], "no penalty"),
])
def test_bad_lambda_flags_give_one_line(tmp_path, capsys, args, needle):
    assert run_main(args, tmp_path / "o") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("args, needle", [
    (["--resume", "--reg_lambda", "0", "1"], "holds a sweep of --reg_lambda 0 3, not 0 1"),
    (["--resume", "--reg_lambda", "3"], "holds a sweep of --reg_lambda 0 3, not 3"),
    (["--resume", "--num_epochs", "2"], "--num_epochs 1, not 2"),
    (["--reg_lambda", "0", "3"], "already holds a run or a sweep"),
    (["--reg_lambda", "0", "3", "--resume", "--overwrite"], "either --resume"),
    (["--reg_lambda", "3", "--overwrite"], "a single run needs another --output_dir"),
])
def test_a_sweep_folder_refuses_another_sweep(tmp_path, capsys, sweep_run, args, needle):
    out = tmp_path / "m"
    shutil.copytree(sweep_run, out)
    assert run_main(args, out) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert snapshot(out) == snapshot(sweep_run)


def test_resume_with_several_values_of_a_single_run_is_refused(capsys, finished_run):
    assert run_main(["--resume", "--reg_lambda", "0", "3"], finished_run) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no sweep" in err and "drop the --reg_lambda values" in err


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "m"
    assert run_main([*AUTO_SETTING, "--reg_lambda", "auto"], out) == 0
    return out


def test_auto_records_the_lambda_chosen_per_task(auto_run):
    doc = results(auto_run)
    chosen = doc["reg_lambda_per_task"]
    assert chosen[0] is None and len(chosen) == 5  # task 1: no penalty to choose
    start, factor = doc["config"]["auto_start"], doc["config"]["auto_factor"]
    ladder = [start * factor ** k for k in range(7)]
    assert all(any(c == pytest.approx(lam) for lam in ladder) for c in chosen[1:])
    assert (doc["config"]["reg_lambda"], doc["config"]["auto_measure"],
            doc["config"]["auto_margin"]) == ("auto", "likelihood", 0.1)


def test_auto_lands_within_the_band_of_the_best_grid_point(auto_run):
    assert results(auto_run)["avg_acc"] >= BEST_GRID_ACC - BAND_PP


@pytest.mark.parametrize("scenario", ["domain", "class"])
def test_auto_runs_under_the_single_head_scenarios(scenario, tmp_path):
    # the search trains on the labels the scenario uses (a class-incremental head over the
    # union), not relabelled a second time
    out = tmp_path / "m"
    assert run_main([*SMALL, "--scenario", scenario, "--reg_lambda", "auto", *FIT_FIRST],
                    out) == 0
    chosen = results(out)["reg_lambda_per_task"]
    assert chosen[0] is None and chosen[1] > 0
    assert len(set(chosen[1:])) == 1  # --auto_fit first keeps the second task's


@pytest.mark.parametrize("reg_lambda, measure", [(3.0, None), ("auto", "accuracy")])
def test_a_run_started_before_the_newer_settings_resumes_as_it_ran(reg_lambda, measure):
    from utils.config import Config

    new = Config.from_flags({"reg_lambda": reg_lambda})
    added = ["scenario", "optimizer", "omega_data", "auto_measure", "auto_tries", "auto_margin",
             "auto_start", "auto_factor", "auto_val_fraction", "auto_fit"]
    stored = {k: v for k, v in new.to_dict().items() if k not in added or (
        reg_lambda == "auto" and k not in ("auto_measure", "auto_tries"))}
    old = Config.resumed(stored, {}, "checkpoint.pth")
    assert (old.scenario, old.optimizer, old.omega_data) == ("task", "sgd", "train")
    # an auto run of then measured accuracy over 10 tries
    assert (old.auto_measure, old.auto_tries) == ((measure, 10) if measure else (None, None))
    assert old.auto_margin == new.auto_margin
