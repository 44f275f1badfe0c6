"""mas_optim.integrations.hf.MasCallback inside a real transformers.Trainer, on a tiny GPT-2."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from importance_reference import assert_close, reference_omega  # noqa: E402
from mas_optim.integrations.hf import MasCallback  # noqa: E402
from tiny_lm import Task, gpt2  # noqa: E402


def trainer(model, task, mas, tmp_path, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=kwargs.pop("steps", 4),
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0, **kwargs)
    return transformers.Trainer(model=model, args=args, train_dataset=task, callbacks=[mas])


def test_omega_of_each_task_comes_from_the_trainers_data_and_anchors_the_weights(tmp_path):
    model = gpt2()
    mas = MasCallback(reg_lambda=1.0)
    task = Task(0)
    trainer(model, task, mas, tmp_path).train()
    want = reference_omega(model, task.inputs())  # Eq. 2, float64, one sample at a time
    assert_close({n: e["omega"] for n, e in mas.mas.reg_params.items()}, want)
    for name, p in model.named_parameters():
        assert torch.equal(mas.mas.reg_params[name]["init_val"], p.detach()), name


def weighted_drift(reg_params, model):
    return sum((e["omega"] * (dict(model.named_parameters())[n] - e["init_val"]).square())
               .sum().item() for n, e in reg_params.items())


def test_the_penalty_goes_on_the_optimizer_the_trainer_builds(tmp_path):
    """Trainer's default AdamW, wrapped by accelerate: the penalty holds the weights that were
    important for task 0 far closer than the same run without it."""
    drift = {}
    for lam in (0.0, 1e4):
        model = gpt2()
        mas = MasCallback(reg_lambda=lam)
        trainer(model, Task(0), mas, tmp_path).train()
        anchored = {n: {k: t.clone() for k, t in e.items()} for n, e in mas.mas.reg_params.items()}
        second = trainer(model, Task(1), mas, tmp_path)
        second.train()
        assert mas.mas.penalty.optimizer is second.optimizer.optimizer  # AcceleratedOptimizer's
        drift[lam] = weighted_drift(anchored, model)
    assert drift[1e4] < 0.05 * drift[0.0], drift


def test_local_sgd_given_to_the_trainer_gets_the_reg_params(tmp_path):
    import mas_optim

    model = gpt2()
    mas = MasCallback()
    trainer(model, Task(0), mas, tmp_path).train()
    opt = mas_optim.LocalSgd(model.named_parameters(), reg_lambda=1.0, lr=0.01, proximal=True)
    second = trainer(model, Task(1), mas, tmp_path, steps=1)
    second.optimizer = opt
    second.train()
    assert opt.reg_params is mas.mas.reg_params
