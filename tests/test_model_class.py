"""model_class: shared backbones, heads, names and frozen layers."""
from __future__ import annotations

import pytest
import torch
import torchvision


import model_class
from model_class import (AlexNetShared, TaskModel, build_shared, freeze_first_layers,
                         new_head)
from utils import AppError
from utils.backbone import build_backbone


@pytest.mark.parametrize("arch, shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)),
                                         ("cnn", (3, 32, 32)), ("mlp", (3, 16, 16))])
def test_backbones_output_the_head_width(arch, shape):
    shared, width = build_shared(arch, shape, 24)
    model = TaskModel(shared, new_head(width, 3, 0))
    assert model(torch.zeros(2, *shape)).shape == (2, 3)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"shared", "head"}


def test_part_state_round_trip():
    shared, width = build_shared("mlp", (1, 8, 8), 8)
    a = TaskModel(shared, new_head(width, 2, 1))
    b = TaskModel(build_shared("mlp", (1, 8, 8), 8)[0], new_head(width, 2, 2))
    b.load_part("shared", a.part_state("shared"))
    b.load_part("head", a.part_state("head"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    assert set(a.part_state("head")) == {"head.weight", "head.bias"}


def test_new_head_is_seeded_and_spares_the_global_rng():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    h1, h2 = new_head(5, 2, 42), new_head(5, 2, 42)
    assert torch.equal(h1.weight, h2.weight) and not torch.equal(h1.weight, new_head(5, 2, 43).weight)
    assert torch.equal(torch.get_rng_state(), before)


def test_alexnet_keeps_torchvision_names_and_freezes_first_convs():
    full = torchvision.models.alexnet(weights=None)
    expected = {k for k in full.state_dict() if not k.startswith("classifier.6.")}
    shared = AlexNetShared(4096)
    assert set(shared.state_dict()) == expected and shared.out_features == 4096
    small = AlexNetShared(8)
    model = TaskModel(small, new_head(8, 2, 0))
    frozen = freeze_first_layers(model, 2)
    assert frozen == ["shared.features.0.weight", "shared.features.0.bias",
                      "shared.features.3.weight", "shared.features.3.bias"]
    assert not model.shared.features[0].weight.requires_grad
    assert model.shared.features[6].weight.requires_grad and model.head.weight.requires_grad
    assert freeze_first_layers(TaskModel(AlexNetShared(8), new_head(8, 2, 0)), 0) == []


def test_alexnet_needs_large_rgb_images(monkeypatch):
    monkeypatch.setattr(model_class, "ALEXNET_WIDTH", 8)
    with pytest.raises(ValueError, match="at least 63"):
        build_shared("alexnet", (1, 8, 8), 8)
    shared, width = build_shared("alexnet", (3, 63, 63), 0)
    assert shared(torch.zeros(1, 3, 63, 63)).shape == (1, width)


def test_pretrained_mismatch_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(model_class, "ALEXNET_WIDTH", 8)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(AppError, match=r"--pretrained .*w.pth: not torchvision AlexNet weights"):
        build_backbone("alexnet", (3, 64, 64), 0, pretrained=str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="not torchvision AlexNet weights"):
        build_shared("alexnet", (3, 64, 64), 0, {"features.0.weight": torch.zeros(1)})


def test_model_class_does_not_import_the_application():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(model_class))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"utils", "train"}, imported
