"""Bad input, damaged and hostile files, divergence: one line on stderr, exit 2, nothing lost."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import FAST, make_image_tasks, run_cli, run_main, snapshot

from utils import AppError


def fails(capsys, args, out, *needles) -> str:
    """Run in-process; assert exit 2 and ONE stderr line containing every needle."""
    assert run_main(args, out) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


# --- flags and data ----------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--init_lr", "0"], "--init_lr"),
    (["--init_lr", "-0.1"], "--init_lr"),
    (["--init_lr", "nan"], "--init_lr"),
    (["--batch_size", "0"], "--batch_size"),
    (["--num_epochs", "0"], "--num_epochs"),
    (["--num_epochs", "-2"], "--num_epochs"),
    (["--reg_lambda", "-1"], "--reg_lambda"),
    (["--accumulate", "2"], "--accumulate"),
    (["--accumulate", "mean"], "--accumulate"),
    (["--arch", "alexnet"], "alexnet"),
    (["--benchmark", "split-digits", "--data_dir", "x"], "--data_dir"),
    (["--benchmark", "split-mnist"], "--mnist_root"),
    (["--image_size", "16"], "--image_size"),
    (["--method", "finetune", "--reg_lambda", "0.5"], "--reg_lambda"),
    (["--augment", "flip"], "--augment"),
    (["--cache_mb", "-1"], "--cache_mb"),
    (["--penalty_step", "adam"], "--penalty_step"),
    (["--resum"], "--resum"),  # no abbreviations: a typo is not taken for --resume
])
def test_bad_flags(tmp_path, capsys, args, needle):
    fails(capsys, args, tmp_path / "out", needle)


def test_data_dir_missing_or_empty(tmp_path, capsys):
    fails(capsys, ["--data_dir", str(tmp_path / "nope")], tmp_path / "o", "no such folder")
    (tmp_path / "empty").mkdir()
    fails(capsys, ["--data_dir", str(tmp_path / "empty")], tmp_path / "o", "no task folders")


def test_task_without_test_folder(tmp_path, capsys):
    data = make_image_tasks(tmp_path / "d")
    shutil.rmtree(data / "task_1" / "test")
    fails(capsys, ["--data_dir", str(data), "--arch", "mlp", "--image_size", "8"], tmp_path / "o",
          "task_1", "no test/")


def test_class_folder_without_images(tmp_path, capsys):
    data = make_image_tasks(tmp_path / "d")
    for image in (data / "task_0" / "train" / "b").iterdir():
        image.unlink()
    (data / "task_0" / "train" / "b" / "notes.txt").write_text("no image here")
    fails(capsys, ["--data_dir", str(data), "--arch", "mlp", "--image_size", "8"], tmp_path / "o",
          os.path.join("task_0", "train", "b"), "without images")


def test_test_class_unknown_to_train(tmp_path, capsys):
    data = make_image_tasks(tmp_path / "d")
    shutil.copytree(data / "task_0" / "test" / "a", data / "task_0" / "test" / "zebra")
    fails(capsys, ["--data_dir", str(data), "--arch", "mlp", "--image_size", "8"], tmp_path / "o",
          "zebra", "not in")


def test_missing_mnist_says_how_to_get_it(tmp_path, capsys):
    fails(capsys, ["--benchmark", "split-mnist", "--mnist_root", str(tmp_path)], tmp_path / "o",
          "MNIST not found", "train-images-idx3-ubyte")


def test_output_dir_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    fails(capsys, ["--num_epochs", "1"], target, "is a file")
    fails(capsys, ["--resume"], target, "is a file")


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    fails(capsys, ["--resume"], tmp_path / "missing", "nothing to resume")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "shared_model.pth").write_bytes(b"someone else's")
    fails(capsys, ["--resume"], tmp_path / "foreign", "nothing to resume")


def test_bad_pretrained_file(tmp_path, capsys):
    data = make_image_tasks(tmp_path / "d", size=64)
    (tmp_path / "w.pth").write_bytes(b"garbage")
    fails(capsys, ["--data_dir", str(data), "--image_size", "64", "--pretrained",
                   str(tmp_path / "w.pth")], tmp_path / "o", "w.pth", "damaged")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    done = run_cli(["--data_dir", str(tmp_path / "nope")], tmp_path / "o")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# --- damaged and hostile state files -----------------------------------------------------------
DAMAGE = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: os.urandom(64),
}


@pytest.mark.parametrize("target", ["checkpoint.pth", "shared_model.pth", "reg_params.pickle",
                                    "Task_1/head.pth"])
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_file_on_resume(stopped_run, tmp_path, capsys, target, kind):
    out = tmp_path / "m"
    shutil.copytree(stopped_run, out)
    path = out / target
    path.write_bytes(DAMAGE[kind](path.read_bytes()))
    before = snapshot(out)
    line = fails(capsys, [*FAST, "--resume"], out, str(path))
    assert "Traceback" not in line
    assert snapshot(out) == before  # nothing overwritten by the failed attempt


def _hostile(marker):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    return Evil()


@pytest.mark.parametrize("target", ["checkpoint.pth", "shared_model.pth", "Task_1/head.pth",
                                    "reg_params.pickle"])
def test_hostile_file_is_refused_without_running_code(stopped_run, tmp_path, capsys, target):
    out = tmp_path / "m"
    shutil.copytree(stopped_run, out)
    marker = tmp_path / "pwned"
    torch.save({"weights": _hostile(marker)}, out / target)
    fails(capsys, [*FAST, "--resume"], out, target.split("/")[-1])
    assert not marker.exists()


def test_non_finite_values_in_checkpoint_are_refused(stopped_run, tmp_path, capsys):
    out = tmp_path / "m"
    shutil.copytree(stopped_run, out)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    name = next(iter(state["reg_params"]))
    state["reg_params"][name]["omega"][0] = math.inf
    torch.save(state, out / "checkpoint.pth")
    fails(capsys, [*FAST, "--resume"], out, "checkpoint.pth", "NaN or Inf")


def test_resume_with_different_data_is_refused(stopped_run, tmp_path, capsys):
    out = tmp_path / "m"
    shutil.copytree(stopped_run, out)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    state["tasks"][0] = "something else"
    torch.save(state, out / "checkpoint.pth")
    fails(capsys, [*FAST, "--resume"], out, "differ")


# --- divergence --------------------------------------------------------------------------------
def test_gradient_step_divergence_stops_with_advice_and_keeps_the_last_good_state(tmp_path,
                                                                                  capsys):
    out = tmp_path / "m"
    line = fails(capsys, ["--penalty_step", "gradient", "--reg_lambda", "1e6", "--init_lr",
                          "0.1", *FAST], out,
                 "diverged", "--reg_lambda 1000000.0", "--init_lr 0.1", "--penalty_step proximal")
    assert "task 2" in line
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["task"] == 1  # task 1 (no penalty yet) was committed, nothing after it
    assert all(torch.isfinite(v).all() for v in state["shared"].values())
    assert not (out / "Task_2").exists()


def test_checkpoint_that_does_not_fit_the_model_is_refused(stopped_run, tmp_path, capsys):
    out = tmp_path / "m"
    shutil.copytree(stopped_run, out)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    name = next(iter(state["shared"]))
    state["shared"][name] = torch.zeros(3)
    torch.save(state, out / "checkpoint.pth")
    fails(capsys, [*FAST, "--resume"], out, "checkpoint.pth", "does not fit")


def test_failed_overwrite_leaves_the_previous_run_alone(stopped_run, tmp_path, capsys):
    out = tmp_path / "m"
    shutil.copytree(stopped_run, out)
    before = snapshot(out)
    fails(capsys, ["--overwrite", "--data_dir", str(tmp_path / "typo")], out, "no such folder")
    assert snapshot(out) == before
    fails(capsys, ["--data_dir", str(tmp_path / "typo")], tmp_path / "new", "no such folder")
    assert not (tmp_path / "new").exists()


def test_resume_and_overwrite_together(tmp_path, capsys):
    fails(capsys, ["--resume", "--overwrite"], tmp_path / "m", "--resume", "--overwrite")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02"]))
def test_any_bytes_as_checkpoint_give_app_error_or_load(tmp_path, data, prefix):
    """Loaders never crash on arbitrary bytes: an AppError naming the file, or a valid load."""
    from utils.checkpoint import CrashTest, RunDir

    path = tmp_path / "checkpoint.pth"
    path.write_bytes(prefix + data)
    try:
        RunDir(tmp_path, CrashTest(None)).load_checkpoint()
    except AppError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


def test_non_finite_reg_params_file_is_refused(stopped_run, tmp_path, capsys):
    import mas_optim

    out = tmp_path / "m"
    shutil.copytree(stopped_run, out)
    reg_params = mas_optim.load_reg_params(out / "reg_params.pickle")
    next(iter(reg_params.values()))["init_val"].view(-1)[0] = math.nan
    mas_optim.save_reg_params(reg_params, out / "reg_params.pickle")
    before = snapshot(out)
    fails(capsys, [*FAST, "--resume"], out, "reg_params.pickle", "NaN or Inf")
    assert snapshot(out) == before


def test_disk_full_is_one_line_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch):
    import json

    import mas_optim

    args = [*FAST, "--num_epochs", "1"]
    assert run_main(args, tmp_path / "whole") == 0
    real, calls = mas_optim.atomic_write, []

    def fills_up(path, data, **kwargs):  # the disk fills up in the middle of the run
        calls.append(path)
        if len(calls) >= 12:
            raise OSError(28, "No space left on device")
        real(path, data, **kwargs)

    monkeypatch.setattr(mas_optim, "atomic_write", fills_up)
    out = tmp_path / "run"
    capsys.readouterr()
    line = fails(capsys, args, out, "cannot write", "No space left on device", "--resume")
    assert str(out) in line
    monkeypatch.setattr(mas_optim, "atomic_write", real)
    assert run_main([*args, "--resume"], out) == 0
    done = json.loads((out / "results.json").read_text())
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert done["acc_matrix"] == whole["acc_matrix"]


def test_failed_first_write_says_to_run_again_not_to_resume(tmp_path, capsys, monkeypatch):
    """Before the first commit there is nothing to resume: the line says to run the same
    command again, and that command then runs."""
    import mas_optim

    real = mas_optim.atomic_write

    def full(path, data, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mas_optim, "atomic_write", full)
    args, out = [*FAST, "--num_epochs", "1"], tmp_path / "run"
    line = fails(capsys, args, out, "checkpoint.pth", "cannot write", "nothing to resume",
                 "run the same command again")
    assert "--resume" not in line
    monkeypatch.setattr(mas_optim, "atomic_write", real)
    assert run_main(args, out) == 0


def test_a_bug_while_restoring_is_not_reported_as_a_bad_checkpoint(stopped_run, tmp_path,
                                                                  monkeypatch):
    """Only a file that does not fit becomes "does not fit"; a programming error surfaces."""
    import model_class

    out = tmp_path / "m"
    shutil.copytree(stopped_run, out)

    def broken(self, part, state):
        raise RuntimeError("a bug")

    monkeypatch.setattr(model_class.TaskModel, "load_part", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        run_main([*FAST, "--resume"], out)
