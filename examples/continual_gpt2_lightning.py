"""Continual fine-tuning of a small GPT-2 on three synthetic text tasks with Lightning, plain
fine-tuning against MAS (mas_optim.integrations.lightning.MasCallback).

Task k's sequences count up with step k + 1 (mod the vocabulary), so the tasks disagree on
every next token: fine-tuning forgets the earlier tasks, MAS holds the weights that mattered for
them. The model is built from a config (random init, nothing downloaded). After each task the
script prints every task's loss. Run:  python examples/continual_gpt2_lightning.py
"""

import lightning.pytorch as L
import torch
import transformers

from mas_optim.integrations.lightning import MasCallback

VOCAB, LENGTH, TASKS = 24, 10, 3
LAMBDA = 1.0  # λ of Eq. 3


class Task(torch.utils.data.Dataset):
    def __init__(self, k, n=24):
        g = torch.Generator().manual_seed(k)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (start + (k + 1) * torch.arange(LENGTH)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LM(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                         n_positions=LENGTH, bos_token_id=0, eos_token_id=0)
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids, labels=None):  # F(x) for the importance pass: the logits
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, _):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@torch.no_grad()
def losses(module, tasks):
    module.eval()
    return [module.model(input_ids=t.ids, labels=t.ids).loss.item() for t in tasks]


def run(method, tasks):
    module = LM()
    callbacks = [MasCallback(reg_lambda=LAMBDA)] if method == "MAS" else []
    for k, task in enumerate(tasks):
        trainer = L.Trainer(max_epochs=3, callbacks=callbacks, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu")
        torch.manual_seed(k)
        trainer.fit(module, torch.utils.data.DataLoader(task, batch_size=8, shuffle=True))
        print(f"{method:12s} after task {k}: " + "  ".join(
            f"task {i} {loss:.3f}" for i, loss in enumerate(losses(module, tasks))), flush=True)


if __name__ == "__main__":
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    tasks = [Task(k) for k in range(TASKS)]
    for method in ("fine-tuning", "MAS"):
        run(method, tasks)
