"""A tiny GPT-2 (built from a config, random init, nothing downloaded) and three synthetic text
tasks, for the framework tests: task k's sequences count up with step k + 1 (mod the vocabulary).
No dropout: Lightning does not restore the RNG on resume, so a resumed run could not match."""

import torch

VOCAB, LENGTH = 24, 10


def gpt2(seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB,
                                     n_positions=LENGTH, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


class Task(torch.utils.data.Dataset):
    """n sequences of task k as {"input_ids", "labels"} (a causal LM predicts each next token)."""

    def __init__(self, k, n=16, seed=0):
        g = torch.Generator().manual_seed(seed * 10 + k)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (start + (k + 1) * torch.arange(LENGTH)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def inputs(self, batch_size=8):
        """The task's batches as compute_omega takes them (no labels)."""
        return [{"input_ids": self.ids[i:i + batch_size]} for i in range(0, len(self), batch_size)]
