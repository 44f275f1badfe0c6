"""train.py --omega_data train|test|DIR: the importance Omega needs inputs only (Aljundi et al.
2018, Sec. 3-4). Omega on a folder of unlabeled images equals Omega on the same images as a
labelled split; folder images become the inputs of the built-in benchmarks as their own images
are; a folder without images is one line."""
from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

import mas_optim
from helpers import make_image_tasks, run_main
from test_train_errors import fails
from utils.data import make_loader, permuted_digits, split_digits
from utils.omega_data import OmegaInputs

FOLDER_RUN = ["--arch", "mlp", "--hidden", "8", "--num_epochs", "1", "--batch_size", "4"]


def _flat_copy(split_dir, flat):
    """Every image of an ImageFolder split, in the split's order, as one flat folder without
    classes (``<class>_<file>``: sorted names keep that order)."""
    flat.mkdir()
    for path in sorted(split_dir.rglob("*.png")):
        shutil.copy(path, flat / f"{path.parent.name}_{path.name}")
    return flat


@pytest.mark.parametrize("split", ["train", "test"])
def test_omega_on_an_unlabeled_folder_equals_omega_on_the_same_labelled_inputs(tmp_path, split):
    data = make_image_tasks(tmp_path / "data", n_tasks=1, per_class=5, size=8, gray=True)
    flat = _flat_copy(data / "task_0" / split, tmp_path / "unlabeled")
    omegas = {}
    for source in (split, str(flat)):
        out = tmp_path / source.replace("/", "_")
        assert run_main(["--data_dir", str(data), *FOLDER_RUN, "--omega_data", source], out) == 0
        omegas[source] = mas_optim.load_reg_params(out / "reg_params.pickle")
    labelled, unlabeled = omegas[split], omegas[str(flat)]
    assert labelled.keys() == unlabeled.keys()
    for name in labelled:
        assert torch.equal(labelled[name]["omega"], unlabeled[name]["omega"]), name
        assert float(labelled[name]["omega"].sum()) > 0


def test_train_and_test_inputs_give_different_omega(tmp_path):
    """The flag reaches the importance pass: the two splits' images differ, and so does Omega."""
    data = make_image_tasks(tmp_path / "data", n_tasks=1, per_class=5, size=8, gray=True)
    omegas = []
    for source in ("train", "test"):
        assert run_main(["--data_dir", str(data), *FOLDER_RUN, "--omega_data", source],
                        tmp_path / source) == 0
        omegas.append(mas_optim.load_reg_params(tmp_path / source / "reg_params.pickle"))
    assert any(not torch.equal(omegas[0][n]["omega"], omegas[1][n]["omega"]) for n in omegas[0])


def _digit_pngs(task, folder):
    """A task's test images as 8-bit PNGs, pixel = round(255 x): what a camera would give."""
    folder.mkdir()
    x = task.test.tensors[0]
    for i, image in enumerate((x[:, 0] * 255).round().to(torch.uint8).numpy()):
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
    return x


def test_folder_images_become_split_digits_inputs(tmp_path):
    tasks = split_digits()
    x = _digit_pngs(tasks[0], tmp_path / "pngs")
    inputs = torch.cat([b[0] for b in make_loader(
        OmegaInputs(str(tmp_path / "pngs"), "split-digits", tasks).dataset(0), 64)])
    torch.testing.assert_close(inputs, x, rtol=0, atol=0.5 / 255 + 1e-6)  # half a grey level


def test_folder_images_get_each_permuted_digits_task_permutation(tmp_path):
    tasks = permuted_digits()
    _digit_pngs(tasks[0], tmp_path / "pngs")  # task 1 is unpermuted
    inputs = torch.cat([b[0] for b in make_loader(
        OmegaInputs(str(tmp_path / "pngs"), "permuted-digits", tasks).dataset(2), 64)])
    torch.testing.assert_close(inputs, tasks[2].test.tensors[0], rtol=0, atol=0.5 / 255 + 1e-6)  # half a grey level


def test_a_folder_without_images_is_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    fails(capsys, ["--omega_data", str(tmp_path / "empty")], tmp_path / "m", "--omega_data",
          "no images")
    assert not (tmp_path / "m").exists()
