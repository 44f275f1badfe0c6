"""Plain helpers for the application tests (train.py, utils/, model_class.py) and benchmarks.

pytest.ini puts the repository root and tests/ on ``sys.path`` (``pythonpath = . tests``), so
test modules ``from helpers import ...`` and ``import train``.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# Small but complete Split Digits run: 5 tasks, 2 epochs, a narrow MLP.
FAST = ["--num_epochs", "2", "--hidden", "16"]


def run_main(args: list[str], out: Path) -> int:
    """``train.main`` in this process (fast: no interpreter start, no torch import)."""
    import train

    return train.main([*args, "--output_dir", str(out)])


def run_cli(args: list[str], out: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``python train.py ...`` in a subprocess (for exit codes, stderr, SIGKILL)."""
    full_env = {k: v for k, v in os.environ.items() if k != "MAS_OPTIM_KILL_AT"}
    full_env.update(env or {})
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    if out is not None:
        cmd += ["--output_dir", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=ROOT)


def ctrl_c_then_resume(proc: subprocess.Popen, out: Path) -> None:
    """SIGINT to a running ``train.py`` writing to ``out`` (stderr piped): it must exit 130 with
    one line naming the command that continues; that command is then run to its end here."""
    import shlex
    import signal

    import train

    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    command = f"python train.py --resume --output_dir {shlex.quote(str(out))}"
    assert err.splitlines() == [f"train.py: interrupted; continue with: {command}"], err
    assert train.main(shlex.split(command)[2:]) == 0


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_image_tasks(root: Path, n_tasks: int = 2, classes: tuple[str, ...] = ("a", "b"),
                     per_class: int = 3, size: int = 12, gray: bool = False) -> Path:
    """``root/task_k/{train,test}/<class>/<i>.png`` with class-dependent brightness; RGB
    images, or grayscale ones (PIL mode "L") with ``gray``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (size, size) if gray else (size, size, 3)
    for t in range(n_tasks):
        for split in ("train", "test"):
            for c, name in enumerate(classes):
                folder = root / f"task_{t}" / split / name
                folder.mkdir(parents=True)
                for i in range(per_class):
                    pixels = rng.integers(0, 60, shape) + 150 * ((c + t) % 2)
                    Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def write_mnist(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """Tiny fake MNIST idx files in ``root/MNIST/raw/`` (the layout torchvision reads)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Path, out: Path, world: int, timeout_s: float) -> list[dict]:
    """``python worker RANK WORLD PORT OUT`` for every rank at once; each writes
    ``OUT/report_RANK.json``, returned in rank order. A rank that fails stops the others at once
    (instead of leaving them waiting in a collective); a hang is killed after ``timeout_s``."""
    import pytest

    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(worker.parent), os.environ.get("PYTHONPATH", "")]))
    # Output to files, not pipes: a full pipe nobody reads would block a rank.
    logs = [open(out / f"log_{r}.txt", "w") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(world), port, str(out)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
             for r, log in enumerate(logs)]
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"{worker.name}: ranks failed or timed out:\n" + "\n".join(
            f"--- rank {r} (exit {p.returncode}):\n{(out / f'log_{r}.txt').read_text()[-3000:]}"
            for r, p in enumerate(procs)))
    return [json.loads((out / f"report_{r}.json").read_text()) for r in range(world)]


def rank_main(run) -> None:
    """The ``__main__`` of a worker that :func:`run_ranks` starts: join the gloo process group
    from ``argv`` (RANK WORLD PORT OUT), then ``run(rank, world, out)``."""
    import datetime
    import traceback

    import torch
    import torch.distributed as dist

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        run(rank, world, out)
    except BaseException:
        # Exit at once, so the test stops the other rank instead of waiting in a collective.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()  # both ranks past their last collective before either tears the group down
    dist.destroy_process_group()
    # The report is written: leave without interpreter finalization, where torch's C++ threads
    # (gloo's, rank 0's TCPStore server) once aborted a finished rank ("terminate called
    # without an active exception", exit -6) in CI.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
