"""train.py under torchrun: 2 gloo processes on loopback.

Every run is ``python -m torch.distributed.run --standalone --nproc_per_node 2 train.py ...`` in
a subprocess with a timeout. torchrun starts its workers in sessions of their own, so on a
timeout (or any failure of the test itself) the workers are found by their parent's id and
killed with their process groups, then torchrun itself: nothing outlives a test.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import ROOT, results, run_main, snapshot

import mas_optim
import model_class
from utils.data import make_loader, split_digits
from utils.evaluate import accuracy

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without gloo")

ONE_EPOCH = ["--num_epochs", "1"]
TIMEOUT = 150  # seconds per torchrun; a run takes about 5-10 s on 2 CPU cores


def _children(pid: int) -> list[int]:
    """Ids of the live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (each leads its own process group) and then torchrun."""
    for child in _children(proc.pid):
        for kill in (lambda: os.killpg(child, signal.SIGKILL),
                     lambda: os.kill(child, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun was started as a session leader
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def torchrun(args: list[str], out: Path, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 train.py ARGS --output_dir OUT``."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("MAS_OPTIM_KILL_AT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                             "MASTER_ADDR", "MASTER_PORT")}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "train.py", *args, "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except BaseException:  # the timeout, or the test being interrupted
        _kill_tree(proc)
        raise
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def exit_codes(stderr: str) -> dict[int, str]:
    """Each failed worker's exit code, from torchrun's failure report."""
    return {int(rank): code for rank, code in
            re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", stderr)}


def app_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("train.py:")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same Split Digits run (1 epoch per task, seed 0) under torchrun and in one process."""
    root = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    done = torchrun(ONE_EPOCH, root / "dist")
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_main(ONE_EPOCH, root / "single") == 0
    return root / "dist", root / "single", done, seconds


def test_torchrun_trains_like_one_process_and_writes_the_tree_once(runs):
    out, single, done, seconds = runs
    # rank 0 alone prints: the report and each task's line once
    assert done.stdout.count("Average accuracy") == 1, done.stdout
    assert done.stdout.count("task 3/5 (digits 4/5) done") == 1
    assert "Traceback" not in done.stderr
    # the same files as one process, no temp files left behind (rank 0 alone writes)
    files = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert files == {str(p.relative_to(single)) for p in single.rglob("*")}
    assert not [f for f in files if f.endswith(".tmp")]
    dist_doc, single_doc = results(out), results(single)
    assert dist_doc["config"] == single_doc["config"]
    assert [len(row) for row in dist_doc["acc_matrix"]] == [1, 2, 3, 4, 5]
    # data-parallel SGD over the same global batches: close to one process (measured 91.51%
    # under torchrun against 91.32% in one process)
    assert abs(dist_doc["avg_acc"] - single_doc["avg_acc"]) <= 3.0, (dist_doc, single_doc)
    reg_params = mas_optim.load_reg_params(out / "reg_params.pickle")
    shared = torch.load(out / "shared_model.pth", weights_only=True)
    assert set(reg_params) == set(shared)
    assert all(float(entry["omega"].sum()) > 0 for entry in reg_params.values())
    # the sharded evaluation (counts summed over ranks) is the full test set's accuracy
    width = dist_doc["config"]["hidden"]
    model = model_class.TaskModel(model_class.build_shared("mlp", (1, 8, 8), width)[0],
                                  model_class.new_head(width, 2, 0))
    model.load_state_dict({**shared, **torch.load(out / "Task_1" / "head.pth",
                                                  weights_only=True)})
    task = split_digits()[0]
    assert accuracy(model, make_loader(task.test, 7), torch.device("cpu")) == \
        dist_doc["final_acc"][0]
    assert seconds < 60


def test_torchrun_resume_after_a_kill_ends_bit_identical(runs, tmp_path):
    """Killed (every rank, SIGKILL) right after task 2 was committed, then ``--resume`` under
    torchrun: every rank loads the committed checkpoint and the run ends byte for byte as the
    uninterrupted one."""
    reference = runs[0]
    out = tmp_path / "m"
    killed = torchrun(ONE_EPOCH, out, env={"MAS_OPTIM_KILL_AT": "after-task:2"})
    assert killed.returncode != 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["task"] == 2
    done = torchrun([*ONE_EPOCH, "--resume"], out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Average accuracy") == 1
    assert snapshot(out) == snapshot(reference)


def test_torchrun_error_on_resume_stops_every_rank_with_exit_2(runs, tmp_path):
    """A damaged checkpoint: one line on stderr (printed by rank 0 only), every worker exits
    with code 2 instead of waiting for the others, nothing is written."""
    out = tmp_path / "m"
    shutil.copytree(runs[0], out)
    path = out / "checkpoint.pth"
    path.write_bytes(path.read_bytes()[:100])
    before = snapshot(out)
    done = torchrun(["--resume"], out)
    assert done.returncode != 0
    lines = app_lines(done.stderr)
    assert len(lines) == 1 and str(path) in lines[0] and "damaged" in lines[0], done.stderr
    assert exit_codes(done.stderr) == {0: "2", 1: "2"}, done.stderr[-3000:]
    assert 'train.py", line' not in done.stderr  # no traceback from a worker
    assert snapshot(out) == before


def test_torchrun_divergence_stops_every_rank(tmp_path):
    """A non-finite loss on any rank stops all of them (at the end of that epoch, since DDP's
    backward needs every rank) with the advice line, the last good checkpoint kept."""
    out = tmp_path / "m"
    done = torchrun(["--penalty_step", "gradient", "--reg_lambda", "1e6", "--init_lr", "0.1",
                     "--num_epochs", "1", "--hidden", "16"], out)
    assert done.returncode != 0
    lines = app_lines(done.stderr)
    assert len(lines) == 1 and "diverged on task 2" in lines[0] and "--reg_lambda" in lines[0]
    assert exit_codes(done.stderr) == {0: "2", 1: "2"}, done.stderr[-3000:]
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["task"] == 1 and not (out / "Task_2").exists()


def test_torchrun_si_path_integral_is_the_same_on_every_rank(tmp_path):
    """SI's importance is not reduced: DDP's averaged gradient and identical steps make it the
    same everywhere. After every task the ranks compare a hash of the weights and reg_params
    and refuse to commit on a difference, so a finished run is the check."""
    out = tmp_path / "m"
    done = torchrun(["--method", "si", "--num_epochs", "1", "--hidden", "16"], out)
    assert done.returncode == 0, done.stderr[-3000:]
    reg_params = mas_optim.load_reg_params(out / "reg_params.pickle")
    assert any(float(entry["omega"].sum()) > 0 for entry in reg_params.values())


# --- the agreement points themselves (utils.distributed.Dist), 2 spawned gloo processes --------
def _agreement_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from utils import AppError
    from utils.distributed import Dist, is_everywhere

    d = Dist.from_env()
    d.start(use_gpu=False)
    seen = []
    try:
        try:  # an error on rank 1 only ends the block on both ranks, with rank 1's message
            with d.error_barrier():
                if rank == 1:
                    raise AppError("only rank 1 saw this")
        except AppError as exc:
            seen.append(f"{is_everywhere(exc)}:{exc}")
        d.check_same({"w": torch.ones(3)}, "w")  # equal: passes
        try:
            d.check_same({"w": torch.ones(3) * (1 + rank)}, "w")
        except AppError as exc:
            seen.append(f"{is_everywhere(exc)}:{exc}")
        seen.append(str(d.sum_counts(rank + 1, 10)))
    finally:
        d.close()
    Path(out, f"rank{rank}.txt").write_text("\n".join(seen))


def test_agreement_points_raise_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_agreement_worker, args=(port, str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the agreement workers hang"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
                proc.join()
    for rank in (0, 1):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert lines[0] == "True:(on rank 1) only rank 1 saw this"
        assert lines[1].startswith("True:the 2 processes disagree on w")
        assert lines[2] == "(3, 20)"


FSDP_TWO_EPOCHS = ["--num_epochs", "2", "--fsdp"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Split Digits, 2 epochs per task, under torchrun with --fsdp, and the same with DDP."""
    root = tmp_path_factory.mktemp("fsdp")
    done = torchrun(FSDP_TWO_EPOCHS, root / "fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = torchrun(FSDP_TWO_EPOCHS[:-1], root / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return root / "fsdp", root / "ddp", done


def assert_trains_like_ddp(out: Path, ddp: Path) -> None:
    """The same averaged gradients, reduce-scattered instead of all-reduced: the weights, Ω and
    final accuracies of the DDP run."""
    shared = torch.load(out / "shared_model.pth", weights_only=True)
    want = torch.load(ddp / "shared_model.pth", weights_only=True)
    assert shared.keys() == want.keys()
    for name, w in want.items():
        assert torch.allclose(shared[name], w, rtol=1e-4, atol=1e-6), name
    omega = mas_optim.load_reg_params(out / "reg_params.pickle")
    want_omega = mas_optim.load_reg_params(ddp / "reg_params.pickle")
    assert omega.keys() == want_omega.keys()
    for name, entry in want_omega.items():
        assert torch.allclose(omega[name]["omega"], entry["omega"], rtol=1e-4, atol=1e-8), name
    doc, want_doc = results(out), results(ddp)
    assert all(abs(a - b) <= 1.0 for a, b in zip(doc["final_acc"], want_doc["final_acc"]))


def test_torchrun_fsdp_trains_like_ddp(fsdp_run):
    out, ddp, done = fsdp_run
    assert done.stdout.count("Average accuracy") == 1 and "Traceback" not in done.stderr
    assert {str(p.relative_to(out)) for p in out.rglob("*")} == \
        {str(p.relative_to(ddp)) for p in ddp.rglob("*")}
    assert_trains_like_ddp(out, ddp)


def test_torchrun_fsdp_resume_mid_task_after_a_kill_ends_bit_identical(fsdp_run, tmp_path):
    """Killed after the first of task 2's epochs was committed (weights, momentum buffers,
    reg_params gathered from the slices), resumed with --fsdp: byte for byte the
    uninterrupted --fsdp run."""
    out = tmp_path / "m"
    killed = torchrun(FSDP_TWO_EPOCHS, out, env={"MAS_OPTIM_KILL_AT": "after-epoch:3"})
    assert killed.returncode != 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (state["task"], state["epoch"]) == (1, 1) and state["optimizer"]["state"]
    done = torchrun([*FSDP_TWO_EPOCHS, "--resume"], out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert snapshot(out) == snapshot(fsdp_run[0])


def test_fsdp_without_torchrun_is_refused(tmp_path):
    assert run_main(["--fsdp"], tmp_path / "m") == 2
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("scenario", ["domain", "class"])
def test_torchrun_fsdp_trains_like_ddp_in_the_other_scenarios(scenario, tmp_path):
    """--scenario domain (one shared head) and class (a head that grows by each task's
    classes, its reg_params grown with it) under --fsdp: the weights, Ω and accuracies of the
    DDP run."""
    args = ["--num_epochs", "1", "--scenario", scenario]
    fsdp = torchrun([*args, "--fsdp"], tmp_path / "fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    ddp = torchrun(args, tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_trains_like_ddp(tmp_path / "fsdp", tmp_path / "ddp")
