"""A framework's own checkpoint round trip resumes bit-identically with the MAS penalty on.

Each test learns task 0, then trains task 1 for 4 steps while the framework checkpoints at step
2; a fresh model, optimizer and callback (as in a new process) resume from that checkpoint and
must end with exactly the uninterrupted run's weights, and the uninterrupted run must differ
from the same run without the penalty (so the comparison can tell).

The ``*_optimizer_state_*`` tests need the optimizer's own ``state_dict`` to carry Ω, θ* and λ
(issue 20, item 1): without it the resumed optimizer has no reg_params and they fail on the
first assertion, which says so.
"""

import warnings

import pytest
import torch

import mas_optim
from tiny_lm import Task, gpt2

L = pytest.importorskip("lightning.pytorch")
transformers = pytest.importorskip("transformers")


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(got, want):
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), f"{n}: max |Δ| {(got[n] - want[n]).abs().max():.3g}"


def assert_differ(a, b):
    assert any(not torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------------- Hugging Face Trainer

def hf_run(model, mas, out, resume=None, optimizer="adamw"):
    """Task 1 for 4 steps, checkpointed every 2, with Trainer's AdamW or a LocalSgd of the
    callback's λ (the proximal step: λ 1e3 is far beyond the explicit step's stable range)."""
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2,
        report_to=[], save_strategy="steps", save_steps=2, logging_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0)
    optimizers = (None, None) if optimizer == "adamw" else (mas_optim.LocalSgd(
        model.named_parameters(), reg_lambda=mas.mas.reg_lambda, lr=1e-2, momentum=0.9,
        proximal=True), None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Task(1), callbacks=[mas],
                                   optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    return weights(model)


def hf_after_task_0(reg_lambda, out):
    from mas_optim.integrations.hf import MasCallback

    model = gpt2()
    mas = MasCallback(reg_lambda=reg_lambda)
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=Task(0), callbacks=[mas]).train()
    return model, mas


@pytest.mark.parametrize("optimizer", ["adamw", "localsgd"])
def test_hf_trainer_resume_from_checkpoint_with_the_callback_is_bit_identical(tmp_path,
                                                                             optimizer):
    """The checkpoint is moved away from output_dir first: the callback finds Ω/θ* in the
    optimizer state Trainer loaded, wherever the checkpoint was."""
    from mas_optim.integrations.hf import MasCallback

    model, mas = hf_after_task_0(1e3, tmp_path / "task0")
    want = hf_run(model, mas, tmp_path / "run", optimizer=optimizer)
    moved = tmp_path / "elsewhere"
    (tmp_path / "run" / "checkpoint-2").rename(moved)
    fresh = MasCallback(reg_lambda=1e3)  # a new process: no reg_params in memory
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = hf_run(gpt2(seed=5), fresh, tmp_path / "resumed", resume=str(moved),
                     optimizer=optimizer)
    assert_same(got, want)
    assert not [w for w in caught if "mas_optim" in w.filename]  # no "Ω/θ* dropped"
    for key in ("omega", "init_val"):  # what the next task starts from, too
        assert_same({n: e[key] for n, e in fresh.mas.reg_params.items()},
                    {n: e[key] for n, e in mas.mas.reg_params.items()})
    free_model, free = hf_after_task_0(0.0, tmp_path / "task0")
    assert_differ(hf_run(free_model, free, tmp_path / "free", optimizer=optimizer), want)


def test_hf_resume_without_omega_in_the_checkpoint_while_holding_reg_params_is_an_error(
        tmp_path):
    from mas_optim.integrations.hf import MasCallback

    free = transformers.TrainerCallback()  # checkpoints of a run without the callback
    hf_run(gpt2(), free, tmp_path / "run")
    _, mas = hf_after_task_0(1e3, tmp_path / "task0")
    held = MasCallback(reg_lambda=1e3, reg_params=mas.mas.reg_params)
    with pytest.raises(ValueError, match="optimizer state carries no Ω/θ"):
        hf_run(gpt2(), held, tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-2"))


# ------------------------------------------------------------------------------- Lightning

class LM(L.LightningModule):
    def __init__(self, seed=0, reg_params=None, reg_lambda=1e3):
        super().__init__()
        self.model = gpt2(seed)
        self.reg_params, self.reg_lambda = reg_params, reg_lambda

    def forward(self, input_ids, labels=None):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, _):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return mas_optim.LocalSgd(self.named_parameters(), reg_params=self.reg_params,
                                  reg_lambda=self.reg_lambda, lr=0.05, momentum=0.9)


def lightning_fit(module, task, callbacks, root, ckpt_path=None, steps=4):
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=str(root), deterministic=True)
    trainer.fit(module, torch.utils.data.DataLoader(task, batch_size=8), ckpt_path=ckpt_path)
    return trainer


def every_2_steps(root):
    return L.callbacks.ModelCheckpoint(dirpath=str(root), every_n_train_steps=2, save_top_k=-1,
                                       filename="{step}")


def lightning_after_task_0(reg_lambda, root):
    from mas_optim.integrations.lightning import MasCallback

    module = LM(reg_lambda=reg_lambda)
    mas = MasCallback()
    lightning_fit(module, Task(0), [mas], root, steps=2)
    return module, mas


def test_lightning_resume_from_checkpoint_with_the_callback_is_bit_identical(tmp_path):
    from mas_optim.integrations.lightning import MasCallback

    module, mas = lightning_after_task_0(1e3, tmp_path)
    lightning_fit(module, Task(1), [mas, every_2_steps(tmp_path / "run")], tmp_path)
    want = weights(module)
    resumed = LM(seed=5)
    lightning_fit(resumed, Task(1), [MasCallback()], tmp_path,
                  ckpt_path=str(tmp_path / "run" / "step=2.ckpt"))
    assert_same(weights(resumed), want)
    free, free_mas = lightning_after_task_0(0.0, tmp_path)
    lightning_fit(free, Task(1), [free_mas], tmp_path)
    assert_differ(weights(free), want)


def test_lightning_resume_restores_the_penalty_from_the_optimizer_state_alone(tmp_path):
    """LocalSgd from configure_optimizers, reg_params given by hand, no callback: the resumed
    module builds its LocalSgd without reg_params and the checkpoint must restore them."""
    module = LM()
    lightning_fit(module, Task(0), [], tmp_path, steps=2)
    reg = mas_optim.init_reg_params(module)
    omega = mas_optim.compute_omega(module, Task(0).inputs())
    mas_optim.consolidate_reg_params(reg, module, omega)
    module.reg_params = reg
    lightning_fit(module, Task(1), [every_2_steps(tmp_path / "run")], tmp_path)
    want = weights(module)

    resumed = LM(seed=5)  # reg_params=None: what a new process's configure_optimizers builds
    seen = {}

    class Penalty(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["entries"] = len(trainer.optimizers[0].reg_params)

    lightning_fit(resumed, Task(1), [Penalty()], tmp_path,
                  ckpt_path=str(tmp_path / "run" / "step=2.ckpt"))
    assert seen["entries"] == len(reg), (
        f"the resumed LocalSgd holds {seen['entries']} reg_params entries, the checkpointed one "
        f"{len(reg)}: the optimizer's state_dict does not carry the MAS penalty (issue 20 item 1)")
    assert_same(weights(resumed), want)
