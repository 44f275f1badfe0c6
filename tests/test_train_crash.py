"""Kill -9 at named points and at a random moment; --resume must end bit-identical.

The killed runs are real subprocesses (``MAS_OPTIM_KILL_AT`` makes train.py SIGKILL itself at a
named point), several at a time to keep the suite fast; the resumes run in-process.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import FAST, ROOT, ctrl_c_then_resume, results, run_cli, run_main, snapshot

# Each point is hit in a Split Digits run of 5 tasks x 2 epochs (checkpoint writes: 1 initial,
# then per task 2 epochs + 1 task commit). The very first checkpoint write is left out: a run
# killed before its first checkpoint has nothing to resume (and says so).
POINTS = [
    "mid-epoch:6", "importance:5", "write:checkpoint.pth:9", "write:shared_model.pth:3",
    "write:reg_params.pickle:2", "write:Task_1/head.pth", "write:accuracy.png", "after-task:2",
]
PARALLEL = 4


def _start(out, kill_at: str | None, resume: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MAS_OPTIM_KILL_AT"}
    if kill_at:
        env["MAS_OPTIM_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *FAST, "--output_dir",
                             str(out), *(["--resume"] if resume else [])], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _assert_identical(out, reference) -> None:
    assert results(out)["acc_matrix"] == results(reference)["acc_matrix"]
    assert snapshot(out) == snapshot(reference)  # every file, byte for byte


def test_kill_at_every_named_point_then_resume_identically(tmp_path, finished_run):
    outs = {point: tmp_path / point.replace(":", "_").replace("/", "_") for point in POINTS}
    for i in range(0, len(POINTS), PARALLEL):
        procs = {p: _start(outs[p], p) for p in POINTS[i:i + PARALLEL]}
        for point, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == -signal.SIGKILL, f"{point} not reached: {err}"
    for point, out in outs.items():
        assert not list(out.rglob("*.tmp")) or point.startswith("write:")
        assert run_main([*FAST, "--resume"], out) == 0, point
        assert not list(out.rglob("*.tmp")), point  # leftovers of the killed write are gone
        _assert_identical(out, finished_run)


def test_killed_again_while_resuming(tmp_path, finished_run):
    """Kills in a row, the resume itself interrupted, still end identically."""
    out = tmp_path / "m"
    for i, point in enumerate(("write:results.json:2", "after-epoch:3")):
        proc = _start(out, point, resume=i > 0)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"{point}: {err}"
    assert run_main([*FAST, "--resume"], out) == 0
    _assert_identical(out, finished_run)


def _wait_for_first_checkpoint(out, proc) -> None:
    """Until the run in ``out`` has committed its first checkpoint (or ended)."""
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.pth").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_kill_at_a_random_moment_then_resume_identically(tmp_path, finished_run):
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.0, 1.5)
    out = tmp_path / "m"
    proc = _start(out, None)
    _wait_for_first_checkpoint(out, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert run_main([*FAST, "--resume"], out) == 0, f"random kill seed {seed}"
    _assert_identical(out, finished_run)


def test_ctrl_c_prints_the_resume_command_and_exits_130(tmp_path, finished_run):
    """SIGINT mid-run: one line on stderr (no traceback), exit code 130, and the command it
    names continues the run to the uninterrupted result."""
    out = tmp_path / "m"
    proc = _start(out, None)
    _wait_for_first_checkpoint(out, proc)
    ctrl_c_then_resume(proc, out)
    _assert_identical(out, finished_run)


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, capsys,
                                                                           monkeypatch):
    import train

    def interrupt(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_tasks", interrupt)
    assert run_main(FAST, tmp_path / "m") == 130
    assert capsys.readouterr().err.splitlines() == [
        "train.py: interrupted before the run's first checkpoint: nothing to resume; run the "
        "same command again"]
    assert not (tmp_path / "m" / "checkpoint.pth").exists()


def test_the_resume_command_after_ctrl_c_repeats_the_flags_the_run_does_not_store(
        tmp_path, capsys, monkeypatch):
    """Settings stored with the run come back on --resume; the others (--cache_mb here) are
    named in the command, which then continues the run."""
    import shlex

    import train
    from utils.trainer import Trainer

    real = Trainer.run

    def interrupt(self, state, resumed):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "run", interrupt)
    out = tmp_path / "m"
    assert run_main([*FAST, "--num_epochs", "1", "--cache_mb", "100"], out) == 130
    command = (f"python train.py --resume --output_dir {shlex.quote(str(out))} "
               "--cache_mb 100")
    assert capsys.readouterr().err.splitlines() == [
        f"train.py: interrupted; continue with: {command}"]
    monkeypatch.setattr(Trainer, "run", real)
    assert train.main(shlex.split(command)[2:]) == 0


def test_a_mid_task_checkpoint_holds_omega_and_theta_star_once(tmp_path):
    from utils.checkpoint import CHECKPOINT, RunState
    from utils.fsdp import MAS_STATE_KEYS

    out = tmp_path / "m"
    # killed after task 2's first epoch: the checkpoint holds its optimizer state
    done = run_cli(FAST, out, env={"MAS_OPTIM_KILL_AT": "after-epoch:3"})
    assert done.returncode == -9, done.stderr
    state = RunState.load(out / CHECKPOINT)
    assert state.task == 1 and state.reg_params
    saved = {key for entry in state.optimizer["state"].values() for key in entry}
    assert "momentum_buffer" in saved and not saved & set(MAS_STATE_KEYS)


def test_ctrl_c_just_after_the_first_checkpoint_is_renamed_offers_to_resume(tmp_path, capsys,
                                                                            monkeypatch):
    """The checkpoint is on disk once renamed, even if Ctrl-C lands before save_checkpoint
    returns: the line must offer --resume, not "nothing to resume"."""
    from utils.checkpoint import CHECKPOINT, RunDir

    write = RunDir.write

    def write_then_interrupt(self, rel, data):
        write(self, rel, data)
        if rel == CHECKPOINT:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "write", write_then_interrupt)
    out = tmp_path / "m"
    assert run_main(FAST, out) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"train.py: interrupted; continue with: python train.py --resume --output_dir {out}"]


def test_an_error_raised_while_ctrl_c_unwinds_still_ends_with_the_resume_line(tmp_path, capsys,
                                                                            monkeypatch):
    """A library's cleanup failing under Ctrl-C (tqdm's lock, seen in a test run) is still
    Ctrl-C: the one line and exit code 130, no traceback."""
    import train

    def interrupt_then_fail_in_cleanup(config):
        try:
            raise KeyboardInterrupt
        finally:
            raise AttributeError("type object 'tqdm' has no attribute '_lock'")

    monkeypatch.setattr(train, "load_tasks", interrupt_then_fail_in_cleanup)
    assert run_main(FAST, tmp_path / "m") == 130
    assert capsys.readouterr().err.splitlines() == [
        "train.py: interrupted before the run's first checkpoint: nothing to resume; run the "
        "same command again"]


def test_an_error_not_raised_under_ctrl_c_is_not_taken_for_one(tmp_path, monkeypatch):
    import train

    def fail(config):
        raise AttributeError("a bug")

    monkeypatch.setattr(train, "load_tasks", fail)
    with pytest.raises(AttributeError, match="a bug"):
        run_main(FAST, tmp_path / "m")


def test_ctrl_c_while_starting_prints_one_line_and_writes_nothing(tmp_path):
    """SIGINT half a second in, while torch is still being imported (seconds on any machine):
    exit code 130 and one line, no traceback; had the imports finished, the run's own line."""
    out = tmp_path / "m"
    proc = _start(out, None)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.splitlines() in (
        ["train.py: interrupted while starting, before anything was written"],
        ["train.py: interrupted before the run's first checkpoint: nothing to resume; run the "
         "same command again"]), err
    assert not (out / "checkpoint.pth").exists()
