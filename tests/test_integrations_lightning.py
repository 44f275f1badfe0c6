"""mas_optim.integrations.lightning.MasCallback inside a real Lightning Trainer (tiny GPT-2)."""

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")

import mas_optim  # noqa: E402
from importance_reference import assert_close, reference_omega  # noqa: E402
from mas_optim.integrations.lightning import MasCallback  # noqa: E402
from tiny_lm import Task, gpt2  # noqa: E402


class LM(L.LightningModule):
    """A tiny GPT-2 as a LightningModule; ``optimizer``: "adamw" or "localsgd"."""

    def __init__(self, optimizer="adamw", seed=0):
        super().__init__()
        self.model = gpt2(seed)
        self.optimizer = optimizer

    def forward(self, input_ids, labels=None):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, _):
        return self.model(**batch).loss

    def configure_optimizers(self):
        if self.optimizer == "localsgd":
            return mas_optim.LocalSgd(self.named_parameters(), reg_lambda=1e4, lr=0.05,
                                      momentum=0.9, proximal=True)
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def fit(module, task, mas, tmp_path, **kwargs):
    trainer = L.Trainer(max_steps=kwargs.pop("steps", 4), callbacks=[mas], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu",
                        default_root_dir=str(tmp_path), **kwargs)
    trainer.fit(module, torch.utils.data.DataLoader(task, batch_size=8))
    return trainer


def test_omega_of_each_task_comes_from_the_train_dataloader_and_anchors_the_weights(tmp_path):
    module = LM()
    mas = MasCallback(reg_lambda=1.0)
    task = Task(0)
    fit(module, task, mas, tmp_path)
    want = reference_omega(module, task.inputs())  # Eq. 2, float64, one sample at a time
    assert_close({n: e["omega"] for n, e in mas.mas.reg_params.items()}, want)
    for name, p in module.named_parameters():
        assert torch.equal(mas.mas.reg_params[name]["init_val"], p.detach()), name


@pytest.mark.parametrize("optimizer", ["adamw", "localsgd"])
def test_the_penalty_goes_on_the_optimizer_configure_optimizers_returns(tmp_path, optimizer):
    drift = {}
    for lam in (0.0, 1e4):
        module = LM(optimizer)
        mas = MasCallback(reg_lambda=lam)
        fit(module, Task(0), mas, tmp_path)
        anchored = {n: {k: t.clone() for k, t in e.items()} for n, e in mas.mas.reg_params.items()}
        if optimizer == "localsgd" and lam == 0.0:
            module.optimizer = "sgd"  # LocalSgd carries its own λ: the free run is plain SGD
        trainer = fit(module, Task(1), mas, tmp_path)
        if lam:
            opt = trainer.optimizers[0]
            held = opt.reg_params if optimizer == "localsgd" else mas.mas.penalty.reg_params
            assert held is mas.mas.reg_params
        named = dict(module.named_parameters())
        drift[lam] = sum((e["omega"] * (named[n] - e["init_val"]).square()).sum().item()
                         for n, e in anchored.items())
    assert drift[1e4] < 0.25 * drift[0.0], drift  # AdamW: steps of about lr whatever λ
