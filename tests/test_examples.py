"""The examples in examples/ run as a user runs them (a subprocess) and print what they say:
each task's loss after each task, for fine-tuning and for MAS, and MAS forgets task 0 less."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(fine-tuning|MAS)\s+after task (\d): (.*)$")


@pytest.mark.parametrize("example, needs", [("continual_gpt2_hf.py", "transformers"),
                                            ("continual_gpt2_lightning.py", "lightning")])
def test_example_prints_each_tasks_loss_and_mas_forgets_less(example, needs):
    pytest.importorskip(needs)
    pytest.importorskip("transformers")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / example)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    table = {}
    for line in run.stdout.splitlines():
        m = LINE.match(line)
        if m:
            losses = [float(v) for v in re.findall(r"task \d ([0-9.]+)", m.group(3))]
            assert len(losses) == 3 and all(math.isfinite(v) for v in losses), line
            table[m.group(1), int(m.group(2))] = losses
    assert set(table) == {(m, k) for m in ("fine-tuning", "MAS") for k in range(3)}, run.stdout
    # fine-tuning forgets task 0; MAS ends with a lower task-0 loss
    assert table["fine-tuning", 2][0] > table["fine-tuning", 0][0]
    assert table["MAS", 2][0] < table["fine-tuning", 2][0]
