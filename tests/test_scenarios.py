"""train.py --scenario task|domain|class and --optimizer sgd|adam|adamw: each scenario end to end
on the built-in digits, its accuracy recomputed from the saved files by its definition
(utils/scenarios.py), the growing head's reg_params, a bit-identical resume under AdamW, the
published Split MNIST setting on tiny idx files, and one clear line for each bad input."""
from __future__ import annotations

import pytest
import torch

import mas_optim
import model_class
from helpers import FAST, results, run_cli, run_main, snapshot, write_mnist
from test_train_errors import fails
from utils.data import make_loader, permuted_digits, split_digits

ONE_EPOCH = ["--num_epochs", "1", "--hidden", "16", "--batch_size", "64"]
# Hsu et al. (2018), Split MNIST: MLP 2x400, Adam lr 1e-3, batch 128, 4 epochs per task
PUBLISHED = ["--benchmark", "split-mnist", "--optimizer", "adam", "--hidden", "400",
             "--init_lr", "0.001", "--batch_size", "128", "--num_epochs", "4"]


@torch.no_grad()
def _final_accuracy(out, tasks, head_rows: int, label_offset) -> list[float]:
    """Accuracy on each task's test set of the saved final model (shared_model.pth + the last
    task's head), the prediction the argmax over all ``head_rows`` outputs and the true label
    ``label_offset(j) + y``: the scenario's definition, computed here without the trainer."""
    shared, width = model_class.build_shared("mlp", (1, 8, 8), 16)
    model = model_class.TaskModel(shared, model_class.new_head(width, head_rows, 0))
    state = torch.load(out / "shared_model.pth", weights_only=True)
    state.update(torch.load(out / f"Task_{len(tasks)}" / "head.pth", weights_only=True))
    model.load_state_dict(state)
    model.eval()
    accs = []
    for j, task in enumerate(tasks):
        correct = total = 0
        for x, y in make_loader(task.test, 64):
            correct += int((model(x).argmax(1) == y + label_offset(j)).sum())
            total += len(y)
        accs.append(round(100.0 * correct / total, 4))
    return accs


@pytest.mark.parametrize("benchmark, scenario, head_rows, offset", [
    ("split-digits", "domain", 2, lambda j: 0),
    ("split-digits", "class", 10, lambda j: 2 * j),
    ("permuted-digits", "domain", 10, lambda j: 0),
])
def test_single_head_scenario_accuracy_is_its_definition(tmp_path, capsys, benchmark, scenario,
                                                         head_rows, offset):
    out = tmp_path / "m"
    assert run_main(["--benchmark", benchmark, "--scenario", scenario, *ONE_EPOCH], out) == 0
    assert f"Scenario {scenario}:" in capsys.readouterr().out
    doc = results(out)
    assert doc["config"]["scenario"] == scenario
    tasks = split_digits() if benchmark == "split-digits" else permuted_digits()
    assert doc["final_acc"] == _final_accuracy(out, tasks, head_rows, offset)


def test_class_scenario_head_grows_and_is_regularised(tmp_path):
    out = tmp_path / "m"
    assert run_main(["--scenario", "class", *ONE_EPOCH], out) == 0
    for k in range(5):
        head = torch.load(out / f"Task_{k + 1}" / "head.pth", weights_only=True)
        assert head["head.weight"].shape == (2 * (k + 1), 16)
        names = (out / f"Task_{k + 1}" / "classes.txt").read_text().split()
        assert names == [str(d) for d in range(2 * (k + 1))]  # one line per head row
    reg_params = mas_optim.load_reg_params(out / "reg_params.pickle")
    assert reg_params["head.weight"]["omega"].shape == (10, 16)
    # every class's row was trained and scored by Eq. 2 at least once
    assert (reg_params["head.weight"]["omega"].sum(1) > 0).all()


def test_task_scenario_keeps_a_head_per_task_out_of_reg_params(tmp_path):
    out = tmp_path / "m"
    assert run_main(["--scenario", "task", *ONE_EPOCH], out) == 0
    reg_params = mas_optim.load_reg_params(out / "reg_params.pickle")
    assert not any(name.startswith("head.") for name in reg_params)


def test_class_scenario_under_adamw_resumes_bit_identically(tmp_path):
    args = [*FAST, "--scenario", "class", "--optimizer", "adamw"]
    assert run_main(args, tmp_path / "ref") == 0
    # killed after task 2's first epoch: a grown head, AdamW's moments in the checkpoint
    killed = run_cli(args, tmp_path / "m", env={"MAS_OPTIM_KILL_AT": "after-epoch:3"})
    assert killed.returncode == -9, killed.stderr
    assert run_main([*args, "--resume"], tmp_path / "m") == 0
    assert snapshot(tmp_path / "m") == snapshot(tmp_path / "ref")


def test_published_split_mnist_setting_runs_on_tiny_idx_files(tmp_path):
    root = write_mnist(tmp_path / "mnist")
    out = tmp_path / "m"
    assert run_main([*PUBLISHED, "--mnist_root", str(root), "--scenario", "class",
                     "--reg_lambda", "0.1"], out) == 0
    doc = results(out)
    config = doc["config"]
    assert (config["optimizer"], config["init_lr"], config["batch_size"], config["hidden"],
            config["penalty_step"]) == ("adam", 0.001, 128, 400, "gradient")
    assert len(doc["acc_matrix"]) == 5
    head = torch.load(out / "Task_5" / "head.pth", weights_only=True)
    assert head["head.weight"].shape == (10, 400)


def test_adam_takes_its_own_defaults_and_sgd_keeps_the_preset():
    from utils.config import Config

    adam = Config.from_flags({"optimizer": "adam"})
    assert (adam.init_lr, adam.penalty_step) == (0.001, "gradient")
    assert Config.from_flags({"optimizer": "adamw", "init_lr": 0.01}).init_lr == 0.01
    sgd = Config.from_flags({})
    assert (sgd.optimizer, sgd.init_lr, sgd.penalty_step) == ("sgd", 0.02, "proximal")


@pytest.mark.parametrize("args, needles", [
    (["--scenario", "online"], ["--scenario", "online"]),
    (["--optimizer", "rmsprop"], ["--optimizer", "rmsprop"]),
    (["--optimizer", "adam", "--penalty_step", "proximal"], ["--penalty_step proximal"]),
    (["--optimizer", "adamw", "--proximal"], ["--penalty_step proximal"]),
    (["--optimizer", "adam", "--method", "si"], ["--method si", "--optimizer sgd"]),
    (["--omega_data", "no/such/folder"], ["--omega_data", "neither train, test nor a folder"]),
])
def test_bad_new_flags_give_one_line(tmp_path, capsys, args, needles):
    line = fails(capsys, args, tmp_path / "m", *needles)
    assert line.startswith("train.py: error:")
    assert not (tmp_path / "m").exists()


def test_domain_scenario_refuses_tasks_of_different_class_counts(tmp_path, capsys):
    from helpers import make_image_tasks

    data = make_image_tasks(tmp_path / "two", n_tasks=1, size=8, gray=True)
    make_image_tasks(tmp_path / "three", n_tasks=1, classes=("a", "b", "c"), size=8, gray=True)
    (tmp_path / "three" / "task_0").rename(data / "task_1")
    fails(capsys, ["--data_dir", str(data), "--arch", "mlp", "--scenario", "domain"],
          tmp_path / "m", "--scenario domain", "task_1 has 3 classes")


def test_fsdp_with_adam_is_refused_in_one_line():
    from utils import AppError
    from utils.config import Config
    from utils.optimizers import check_sharding

    with pytest.raises(AppError, match="--fsdp supports --optimizer sgd only"):
        check_sharding(Config.from_flags({"optimizer": "adam", "fsdp": True}))
    check_sharding(Config.from_flags({"fsdp": True}))  # sgd: sharded as before
