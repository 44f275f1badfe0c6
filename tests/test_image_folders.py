"""Image folders: channels, augmentation and normalisation chosen per data and backbone, the
decoded-image cache, torchvision's folder scan with one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import train
from data_fixtures import write_png_tasks
from helpers import make_image_tasks, run_main
from utils import AppError
from utils.data import make_loader
from utils.folders import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, image_folder_tasks


def _pixels(path, mode: str) -> np.ndarray:
    """The file's pixels as (C, H, W) floats in [0, 1], read by PIL directly."""
    x = np.asarray(Image.open(path).convert(mode), dtype=np.float64) / 255.0
    return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


def _normalised(path, p: Preprocessing) -> torch.Tensor:
    x = _pixels(path, "L" if p.channels == 1 else "RGB")
    mean, std = np.array(p.mean)[:, None, None], np.array(p.std)[:, None, None]
    return torch.tensor((x - mean) / std, dtype=torch.float32)


def test_grayscale_folder_gives_a_one_channel_model_input(tmp_path):
    tasks = image_folder_tasks(str(write_png_tasks(tmp_path / "d", "L")), 6, arch="mlp")
    assert tasks[0].preprocessing.channels == 1 and tasks[1].input_shape == (1, 6, 6)
    x, _ = next(iter(make_loader(tasks[1].train, 4)))
    assert x.shape == (4, 1, 6, 6)


def test_colour_folder_gives_an_rgb_model_input(tmp_path):
    tasks = image_folder_tasks(str(write_png_tasks(tmp_path / "d", "RGB")), 6, arch="cnn")
    assert tasks[0].input_shape == (3, 6, 6)


def test_one_colour_image_makes_the_sequence_rgb(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    Image.new("RGB", (6, 6), (200, 10, 10)).save(data / "task_1" / "test" / "a" / "9.png")
    tasks = image_folder_tasks(str(data), 6, arch="mlp")
    assert tasks[0].input_shape == (3, 6, 6)
    grey = data / "task_0" / "train" / "a" / "0.png"
    assert torch.allclose(tasks[0].train[0][0], _normalised(grey, tasks[0].preprocessing),
                          atol=1e-6)


def test_alexnet_gets_rgb_imagenet_normalisation_and_flips_by_default(tmp_path):
    p = image_folder_tasks(str(write_png_tasks(tmp_path / "d", "L")), 6)[0].preprocessing
    assert (p.channels, p.mean, p.std, p.augment) == (3, IMAGENET_MEAN, IMAGENET_STD, "flip")


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_mlp_and_cnn_do_not_flip_by_default(tmp_path, arch):
    data = write_png_tasks(tmp_path / "d", "L")
    task = image_folder_tasks(str(data), 6, arch=arch)[0]
    assert task.preprocessing.augment == "none"
    torch.manual_seed(0)
    for i, (path, label) in enumerate(task.train.samples * 4):  # many draws: never mirrored
        x, y = task.train[i % len(task.train)]
        assert y == label and torch.allclose(x, _normalised(path, task.preprocessing), atol=1e-6)


def test_flip_mirrors_training_images_at_random_and_test_images_never(tmp_path):
    task = image_folder_tasks(str(write_png_tasks(tmp_path / "d", "L")), 6, arch="mlp",
                              augment="flip")[0]
    torch.manual_seed(0)
    seen = set()
    for _ in range(10):
        for i, (path, _) in enumerate(task.train.samples):
            plain = _normalised(path, task.preprocessing)
            x = task.train[i][0]
            mirrored = torch.allclose(x, plain.flip(-1), atol=1e-6)
            assert mirrored or torch.allclose(x, plain, atol=1e-6)
            seen.add(mirrored)
    assert seen == {True, False}
    for i, (path, _) in enumerate(task.test.samples):
        assert torch.allclose(task.test[i][0], _normalised(path, task.preprocessing), atol=1e-6)


def test_normalisation_statistics_are_the_first_tasks_training_pixels(tmp_path):
    data = write_png_tasks(tmp_path / "d", "RGB")
    p = image_folder_tasks(str(data), 6, arch="mlp", normalize="data")[0].preprocessing
    files = sorted((data / "task_0" / "train").rglob("*.png"))
    pixels = np.stack([_pixels(f, "RGB") for f in files])
    assert np.allclose(p.mean, pixels.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    assert np.allclose(p.std, pixels.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)


def test_inputs_match_torchvision_resize_to_tensor_normalize(tmp_path):
    from torchvision import transforms as T

    data = write_png_tasks(tmp_path / "d", "RGB", size=12)
    task = image_folder_tasks(str(data), 7, arch="alexnet", augment="none")[0]
    reference = T.Compose([T.Resize((7, 7)), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for i, (path, _) in enumerate(task.train.samples):
        assert torch.allclose(task.train[i][0], reference(Image.open(path).convert("RGB")),
                              atol=1e-5)


def test_statistics_are_saved_and_reused_on_resume(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    first = image_folder_tasks(str(data), 6, arch="mlp", normalize="data")[0].preprocessing
    stored = json.loads(json.dumps(first.to_dict()))  # as the run's config keeps it
    assert Preprocessing.from_dict(stored) == first
    for path in (data / "task_0" / "train").rglob("*.png"):  # the data changed since
        Image.new("L", (6, 6), 7).save(path)
    assert image_folder_tasks(str(data), 6, arch="mlp", normalize="data")[0].preprocessing != first
    resumed = image_folder_tasks(str(data), 6, arch="mlp", stored=stored)
    assert all(t.preprocessing == first for t in resumed)


@pytest.mark.parametrize("bad, message", [
    ({"image_size": 6, "channels": 1, "augment": "none", "mean": [0.5]}, "keys"),
    ({"image_size": 6, "channels": 2, "augment": "none", "mean": [0.5], "std": [1.0]}, "channels"),
    ({"image_size": 6, "channels": 1, "augment": "none", "mean": [0.5, 0.5], "std": [1.0]}, "mean"),
    ({"image_size": 6, "channels": 1, "augment": "none", "mean": [0.5], "std": [0.0]}, "std"),
    ({"image_size": 6, "channels": 1, "augment": "rotate", "mean": [0.5], "std": [1.0]}, "augment"),
    ({"image_size": "6", "channels": 1, "augment": "none", "mean": [0.5], "std": [1.0]},
     "image_size"),
    ({"image_size": 6, "channels": 1, "augment": "none", "mean": ["x"], "std": [1.0]}, "mean"),
    ([1, 2], "dict"),
])
def test_malformed_stored_preprocessing_is_a_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing.from_dict(bad)


def test_cached_and_decoded_on_access_give_identical_batches(tmp_path):
    data = str(write_png_tasks(tmp_path / "d", "RGB", size=9))
    cached = image_folder_tasks(data, 5, arch="cnn", augment="flip")
    uncached = image_folder_tasks(data, 5, arch="cnn", augment="flip", cache_mb=0)
    assert cached[1].train.images is not None and uncached[1].train.images is None

    def batches(task):
        torch.manual_seed(3)  # the flips come from the global RNG
        return [x for split in (task.train, task.test) for x, _ in make_loader(split, 3, 5)]

    assert all(torch.equal(a, b) for a, b in zip(batches(cached[1]), batches(uncached[1])))


def test_over_the_cache_budget_images_are_decoded_on_access_and_it_says_so(tmp_path):
    data = str(write_png_tasks(tmp_path / "d", "L"))
    lines = []
    tasks = image_folder_tasks(data, 6, arch="mlp", cache_mb=1e-5, log=lines.append)
    assert tasks[0].train.images is None and len(lines) == 1 and "--cache_mb" in lines[0]
    lines.clear()
    assert image_folder_tasks(data, 6, arch="mlp", cache_mb=0, log=lines.append)[0].train.images \
        is None and lines == []


def test_unreadable_image_names_the_file_when_cached(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    (data / "task_1" / "train" / "b" / "2.png").write_bytes(b"not a png")
    with pytest.raises(AppError, match="2.png: cannot read image"):
        image_folder_tasks(str(data), 6, arch="alexnet")


def test_unreadable_image_names_the_file_on_access(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    (data / "task_1" / "train" / "b" / "2.png").write_bytes(b"not a png")
    task = image_folder_tasks(str(data), 6, arch="alexnet", cache_mb=0)[1]
    with pytest.raises(AppError, match="2.png: cannot read image"):
        [task.train[i] for i in range(len(task.train))]


def test_a_colour_image_in_a_stored_grayscale_run_is_an_error(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    stored = image_folder_tasks(str(data), 6, arch="mlp")[0].preprocessing.to_dict()
    Image.new("RGB", (6, 6), (200, 10, 10)).save(data / "task_1" / "test" / "a" / "0.png")
    with pytest.raises(AppError, match="0.png: a colour image"):
        image_folder_tasks(str(data), 6, arch="mlp", stored=stored)


@pytest.mark.parametrize("damage, message", [
    (lambda d: [p.unlink() for p in (d / "task_1" / "test" / "a").iterdir()],
     "task_1/test/a: class folder without images"),
    (lambda d: (d / "task_0" / "test" / "zebra").mkdir(), "test/zebra: class not in"),
    (lambda d: (d / "task_1" / "train").rename(d / "task_1" / "training"),
     "task_1: no train/ folder"),
])
def test_bad_layouts_are_one_line_errors_naming_the_folder(tmp_path, damage, message):
    data = write_png_tasks(tmp_path / "d", "L")
    damage(data)
    with pytest.raises(AppError, match=message) as error:
        image_folder_tasks(str(data), 6, arch="mlp")
    assert "\n" not in str(error.value)


def test_hidden_class_folders_are_ignored(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    (data / "task_0" / "train" / ".ipynb_checkpoints").mkdir()
    assert image_folder_tasks(str(data), 6, arch="mlp")[0].classes == ["a", "b"]


def test_a_16_bit_image_is_refused_rather_than_clipped(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    deep = np.full((6, 6), 40000, dtype=np.uint16)
    Image.fromarray(deep).save(data / "task_0" / "train" / "a" / "0.png")
    with pytest.raises(AppError, match="0.png: I;16 images"):
        image_folder_tasks(str(data), 6, arch="mlp")


def test_digit_folders_hold_the_benchmarks_images(tmp_path):
    from data_fixtures import write_digit_folders
    from utils.data import split_digits

    data = write_digit_folders(tmp_path / "d", num_tasks=2)
    folders = image_folder_tasks(str(data), 8, arch="mlp")
    p = folders[0].preprocessing
    assert p.channels == 1 and p.augment == "none"
    assert len(folders) == 2
    for bench, folder in zip(split_digits(), folders):
        assert folder.classes == bench.classes
        for split in ("train", "test"):
            x, y = getattr(bench, split).tensors
            xf, yf = next(iter(make_loader(getattr(folder, split), len(y))))
            pixels = xf * p.std[0] + p.mean[0]  # undo the normalisation
            # the same images (8-bit quantised), grouped by class: compare as sorted sets
            key = lambda images: sorted(tuple(i.flatten().tolist()) for i in images)  # noqa
            assert sorted(yf.tolist()) == sorted(y.tolist())
            for label in (0, 1):
                got, want = pixels[yf == label], x[y == label]
                assert got.shape == want.shape
                assert torch.allclose(torch.tensor(key((got * 255).round())),
                                      torch.tensor(key((want * 255).round())), atol=0)


def test_mlp_and_cnn_inputs_are_pixels_over_255_by_default(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    for arch in ("mlp", "cnn"):
        p = image_folder_tasks(str(data), 6, arch=arch)[0].preprocessing
        assert (p.mean, p.std) == ((0.0,), (1.0,)), arch


def test_normalize_none_gives_pixels_over_255(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    task = image_folder_tasks(str(data), 6, arch="mlp", normalize="none")[0]
    assert (task.preprocessing.mean, task.preprocessing.std) == ((0.0,), (1.0,))
    for i, (path, _) in enumerate(task.train.samples):
        assert torch.allclose(task.train[i][0], torch.tensor(_pixels(path, "L")).float(),
                              atol=1e-7)


def test_imagenet_statistics_of_a_grayscale_sequence_are_refused(tmp_path):
    data = write_png_tasks(tmp_path / "d", "L")
    with pytest.raises(AppError, match="--normalize imagenet: .* grayscale"):
        image_folder_tasks(str(data), 6, arch="mlp", normalize="imagenet")


# --- the default backbone for the images' size -------------------------------------------------
def test_small_images_get_an_mlp_by_default_and_one_line_says_why(tmp_path, capsys):
    data = make_image_tasks(tmp_path / "data", size=12)
    assert run_main(["--data_dir", str(data), "--num_epochs", "1"], tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["arch"] == "mlp"
    notes = [line for line in capsys.readouterr().out.splitlines() if "--arch mlp" in line]
    assert len(notes) == 1 and "12-px images (under 64)" in notes[0], notes


def test_images_of_64_px_and_more_keep_alexnet_the_original_default(tmp_path):
    data = str(make_image_tasks(tmp_path / "big", size=64))
    assert "arch" not in train.with_default_backbone({"data_dir": data})  # the preset: alexnet
    small = str(make_image_tasks(tmp_path / "small", size=63))
    assert train.with_default_backbone({"data_dir": small})["arch"] == "mlp"
    assert "arch" not in train.with_default_backbone({"data_dir": small, "image_size": 64})
    given = {"data_dir": small, "arch": "cnn"}
    assert train.with_default_backbone(given) == given  # a given --arch is kept


def test_auto_lambda_validation_split_is_read_without_the_training_flip(tmp_path):
    from utils.lambda_search import split

    task = image_folder_tasks(str(write_png_tasks(tmp_path / "d", "L")), 6, arch="mlp",
                              augment="flip")[0]
    train, val = split(task.train, 0.5, seed=0, t=0)
    torch.manual_seed(0)
    for _ in range(10):  # the held-out images: never mirrored; the rest still are at random
        for j, i in enumerate(val.indices):
            plain = _normalised(task.train.samples[i][0], task.preprocessing)
            assert torch.allclose(val[j][0], plain, atol=1e-6)
    assert train.dataset.flip and not val.dataset.flip
