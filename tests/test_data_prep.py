"""utils/data_prep.py: Tiny-ImageNet -> task folders (on a small fake archive)."""
from __future__ import annotations

from PIL import Image


from utils import data_prep
from utils.folders import image_folder_tasks

WNIDS = [f"n{i:08d}" for i in range(8)]


def fake_tiny_imagenet(root):
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    lines = []
    for c, wnid in enumerate(WNIDS):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (64, 64), (c * 30, i, 0)).save(images / f"{wnid}_{i}.JPEG")
        for i in range(2):
            name = f"val_{c * 2 + i}.JPEG"
            Image.new("RGB", (64, 64), (c * 30, 0, i)).save(root / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def test_prepare_deals_classes_into_tasks(tmp_path):
    source = fake_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    dest = tmp_path / "tasks"
    tasks = data_prep.prepare(source, dest, num_tasks=4, seed=0)
    assert [len(t) for t in tasks] == [2, 2, 2, 2]
    assert sorted(w for t in tasks for w in t) == WNIDS
    assert sorted(p.name for p in dest.iterdir()) == ["Task_1", "Task_2", "Task_3", "Task_4"]
    for k, classes in enumerate(tasks, 1):
        for wnid in classes:
            assert len(list((dest / f"Task_{k}" / "train" / wnid).iterdir())) == 3
            assert len(list((dest / f"Task_{k}" / "test" / wnid).iterdir())) == 2
    assert not (tmp_path / "tasks.partial").exists()
    assert data_prep.deal_classes(WNIDS, 4, 0) == tasks  # a pure function of the seed
    assert data_prep.deal_classes(WNIDS, 4, 1) != tasks
    loaded = image_folder_tasks(str(dest), 16)
    assert [t.classes for t in loaded] == tasks


def test_missing_archive_says_where_to_put_it(tmp_path, capsys):
    assert data_prep.main(["--source", str(tmp_path / "tiny-imagenet-200"),
                           "--dest", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tiny-imagenet-200.zip" in err and "wnids.txt" in err and err.count("\n") == 1


def test_existing_destination_is_refused(tmp_path, capsys):
    source = fake_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    (tmp_path / "out").mkdir()
    assert data_prep.main(["--source", str(source), "--dest", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_main_reports_the_train_command(tmp_path, capsys):
    source = fake_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    assert data_prep.main(["--source", str(source), "--dest", str(tmp_path / "out"),
                           "--num_tasks", "2"]) == 0
    assert "--data_dir" in capsys.readouterr().out
