"""The documentation builds and every ```python block in it runs as pasted.

* ``mkdocs build --strict`` (mkdocs.yml, docs/): a broken link, a page missing from the nav, or
  an API entry (``::: mas_optim.X``) whose name no longer exists fails the build.
* Every ```python block of README.md and docs/*.md runs on its own in an empty folder with
  the repository on PYTHONPATH: a snippet a reader copies works the first time. Signatures,
  fragments and shell commands belong in ```text / ```sh blocks.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mas_optim

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SNIPPET_TIMEOUT_S = 120  # a few seconds on an idle CPU; torch's import dominates


def python_blocks() -> list[tuple[str, str]]:
    """(id "file:line", code) of every ```python block."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == "python":
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{path.relative_to(ROOT)}:{line}", match.group(2)))
    return found


def test_docs_build_strict(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_api_reference_lists_every_public_name():
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^::: mas_optim\.(\w+)\s*$", api, re.M))
    public = {name for name in mas_optim.__all__ if not name.startswith("_")}
    assert public - listed == set(), "add these to docs/api.md"


def test_help_readme_and_train_guide_state_the_same_run_time():
    from utils.config import DEFAULT_RUN_TIME, build_parser

    def words(text: str) -> str:
        return " ".join(text.split())

    assert DEFAULT_RUN_TIME in words(build_parser().format_help())
    for path in (ROOT / "README.md", ROOT / "docs" / "train.md"):
        assert DEFAULT_RUN_TIME in words(path.read_text(encoding="utf-8")), path


def test_every_flag_has_a_row_in_the_train_guide():
    from dataclasses import fields

    from utils.config import Config

    guide = (ROOT / "docs" / "train.md").read_text(encoding="utf-8")
    flags = [f"--{f.name}" for f in fields(Config) if "help" in f.metadata]
    flags += [alias for f in fields(Config) for alias in f.metadata.get("aliases", {})]
    assert [flag for flag in flags if f"| `{flag}" not in guide and f"`{flag}` is" not in guide] \
        == [], "add a row to the flags table of docs/train.md"


@pytest.mark.parametrize("code", [c for _, c in python_blocks()],
                         ids=[i for i, _ in python_blocks()])
def test_python_block_runs_as_pasted(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MAS_OPTIM_KILL_AT", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "models").exists(), "a snippet must not write to train.py's models/"
