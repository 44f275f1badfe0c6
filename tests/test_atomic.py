"""atomic_write: missing folders, open()-like permissions, crash safety."""
from __future__ import annotations

import os
import stat

import pytest
import torch

import mas_optim
from mas_optim.atomic import atomic_write


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_missing_parent_folders_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "c.bin"
    atomic_write(target, b"data")
    assert target.read_bytes() == b"data"
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["c.bin"]


def test_save_reg_params_into_a_missing_folder(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "models" / "reg_params.pickle"
    mas_optim.save_reg_params(mas_optim.init_reg_params(model), path)
    loaded = mas_optim.load_reg_params(path, model=model)
    assert torch.equal(loaded["weight"]["init_val"], model.weight.detach())


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_new_file_gets_the_umask_permissions_open_would_give(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write(tmp_path / "new.bin", b"x")
    with open(tmp_path / "plain.bin", "wb") as f:
        f.write(b"x")
    assert _mode(tmp_path / "new.bin") == _mode(tmp_path / "plain.bin") == expected


def test_replacing_a_file_keeps_its_permissions(tmp_path, umask):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    umask(0o077)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o640


def test_a_crash_before_the_rename_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, b"new", before_replace=crash)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_the_temp_file_is_durable_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "f.bin", b"data")
    temp = events[1][1]
    assert events == [("fsync", temp), ("replace", temp), ("fsync", str(tmp_path))]
    assert os.path.basename(temp).startswith(".f.bin.") and temp.endswith(".tmp")
