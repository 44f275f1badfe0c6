"""Continual fine-tuning of a small GPT-2 on three synthetic text tasks with Hugging Face Trainer,
plain fine-tuning against MAS (mas_optim.integrations.hf.MasCallback).

Task k's sequences count up with step k + 1 (mod the vocabulary), so the tasks disagree on
every next token: fine-tuning forgets the earlier tasks, MAS holds the weights that mattered for
them. The model is built from a config (random init, nothing downloaded). After each task the
script prints every task's loss. Run:  python examples/continual_gpt2_hf.py
"""

import torch
import transformers

from mas_optim.integrations.hf import MasCallback

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


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                     n_positions=LENGTH, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@torch.no_grad()
def losses(model, tasks):
    model.eval()
    return [model(input_ids=t.ids, labels=t.ids).loss.item() for t in tasks]


def run(method, tasks, out):
    model = gpt2()
    callbacks = [MasCallback(reg_lambda=LAMBDA)] if method == "MAS" else []
    args = transformers.TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, num_train_epochs=3, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0)
    for k, task in enumerate(tasks):
        transformers.Trainer(model=model, args=args, train_dataset=task,
                             callbacks=callbacks).train()
        print(f"{method:12s} after task {k}: " + "  ".join(
            f"task {i} {loss:.3f}" for i, loss in enumerate(losses(model, tasks))), flush=True)


if __name__ == "__main__":
    import tempfile

    transformers.logging.set_verbosity_error()
    tasks = [Task(k) for k in range(TASKS)]
    with tempfile.TemporaryDirectory() as out:
        for method in ("fine-tuning", "MAS"):
            run(method, tasks, out)
