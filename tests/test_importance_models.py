"""compute_omega against paper Eq. 2 computed by a float64 batch-size-1 autograd loop, on the
layer kinds and models people train (small sizes)."""

import warnings

import pytest
import torch
from torch import nn

from importance_reference import assert_close, reference_omega
from mas_optim import compute_omega
from mas_optim.importance.rules import rule_for


class TextConv(nn.Module):
    """Embedding + Conv1d + GroupNorm text classifier."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv = nn.Conv1d(8, 12, 3, padding=1)
        self.norm = nn.GroupNorm(3, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, tokens):
        h = self.norm(self.conv(self.emb(tokens).transpose(1, 2))).relu()
        return self.out(h.mean(2))


class Transformer(nn.Module):
    """Embedding + 2-layer TransformerEncoder + LayerNorm; batch_first=False transposes inside,
    so every layer sees (T, B, d)."""

    def __init__(self, batch_first=True, d=16):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(30, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        if not self.batch_first:
            return self.out(self.norm(self.encoder(h.transpose(0, 1))).mean(0))
        return self.out(self.norm(self.encoder(h)).mean(1))


class Recurrent(nn.Module):
    def __init__(self, kind, batch_first):
        super().__init__()
        self.batch_first = batch_first
        if kind == "lstm":
            self.rnn = nn.LSTM(6, 8, num_layers=2, batch_first=batch_first, bidirectional=True)
        elif kind == "lstm_proj":
            self.rnn = nn.LSTM(6, 8, batch_first=batch_first, proj_size=5)
        elif kind == "gru":
            self.rnn = nn.GRU(6, 8, num_layers=2, batch_first=batch_first)
        else:
            self.rnn = nn.RNN(6, 8, nonlinearity="relu", batch_first=batch_first, bias=False)
        self.out = nn.Linear(self.rnn.proj_size or self.rnn.hidden_size * (1 + self.rnn.bidirectional), 3) \
            if isinstance(self.rnn, nn.LSTM) else nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.out(y.mean(1 if self.batch_first else 0))


class Attention(nn.Module):
    """Self-attention with a key padding mask and a causal mask, attention weights returned."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        B, T, _ = x.shape
        pad = x[..., 0] > 1.0  # a key padding mask that depends on the sample
        pad[:, 0] = False
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        h = x if self.batch_first else x.transpose(0, 1)
        y, w = self.attn(h, h, h, key_padding_mask=pad, attn_mask=causal)
        y = y if self.batch_first else y.transpose(0, 1)
        return self.out(y.mean(1)) + w.sum((1, 2)).unsqueeze(1)


class Volumes(nn.Module):
    """Conv3d (circular padding) + InstanceNorm3d, Conv1d/Conv2d with padding='same'."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, padding_mode="circular", bias=False)
        self.inorm = nn.InstanceNorm3d(4, affine=True)
        self.c3b = nn.Conv3d(4, 4, 2, stride=2, dilation=1, groups=2)
        self.c2 = nn.Conv2d(4, 3, 4, padding="same", dilation=2)
        self.c1 = nn.Conv1d(3, 2, 4, padding="same")
        self.out = nn.Linear(2 * 8, 3)

    def forward(self, x):
        h = self.c3b(self.inorm(self.c3(x)).tanh())            # (B, 4, 2, 2, 2)
        h = self.c2(h.flatten(3)).tanh()                       # (B, 3, 2, 4)
        return self.out(self.c1(h.flatten(2)).flatten(1))      # (B, 2, 8)


class Norms(nn.Module):
    """BatchNorm1d on sequences, LayerNorm over two dims, RMSNorm, a Linear subclass."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.ln = nn.LayerNorm((4, 5))
        self.rms = nn.RMSNorm(5)
        self.lin = nn.modules.linear.NonDynamicallyQuantizableLinear(5, 3)

    def forward(self, x):
        return self.lin(self.rms(self.ln(self.bn(x)).tanh())).mean(1)


class TiedLM(nn.Module):
    """The output layer reuses the embedding matrix (weight tying)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, tokens):
        return nn.functional.linear(self.mix(self.emb(tokens)).tanh(), self.emb.weight).mean(1)


def resnet18():
    tv = pytest.importorskip("torchvision")
    return tv.models.resnet18(num_classes=4)


def tokens(shape, vocab=30, generator=None):
    return torch.randint(0, vocab, shape, generator=generator)


CASES = {
    "text_conv1d_groupnorm": (TextConv, lambda g: tokens((5, 7), generator=g)),
    "transformer_batch_first": (Transformer, lambda g: tokens((4, 6), generator=g)),
    "lstm_bidirectional": (lambda: Recurrent("lstm", True), lambda g: torch.randn(4, 5, 6, generator=g)),
    "lstm_proj_seq_first": (lambda: Recurrent("lstm_proj", False), lambda g: torch.randn(4, 5, 6, generator=g)),
    "gru_seq_first": (lambda: Recurrent("gru", False), lambda g: torch.randn(4, 5, 6, generator=g)),
    "rnn_relu": (lambda: Recurrent("rnn", True), lambda g: torch.randn(4, 5, 6, generator=g)),
    "attention_masks": (Attention, lambda g: torch.randn(4, 5, 8, generator=g)),
    "attention_seq_first": (lambda: Attention(False), lambda g: torch.randn(4, 5, 8, generator=g)),
    "conv3d_instancenorm_same_padding": (Volumes, lambda g: torch.randn(3, 2, 4, 4, 4, generator=g)),
    "norms_and_linear_subclass": (Norms, lambda g: torch.randn(5, 4, 5, generator=g)),
    "tied_embedding": (TiedLM, lambda g: tokens((4, 6), vocab=20, generator=g)),
    "resnet18": (resnet18, lambda g: torch.randn(3, 3, 16, 16, generator=g)),
}


def warm_up_batchnorm(model, x):
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x * 2 + 1 if x.is_floating_point() else x)  # running stats unlike the batch's


@pytest.mark.parametrize("case", list(CASES))
def test_exact_against_float64_batch_size_one_loop(case):
    make, data = CASES[case]
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(1)
    batches = [data(g), data(g)[:2]]  # a full batch and a smaller last one
    warm_up_batchnorm(model, batches[0])
    got = compute_omega(model, batches)
    assert_close(got, reference_omega(model, batches))


def test_sequence_first_layers_with_sequence_length_equal_to_batch_size_are_exact():
    torch.manual_seed(0)
    model = Transformer(batch_first=False)
    batches = [tokens((5, 5)), tokens((5, 5))]  # T == B: dim 0 has the batch size everywhere
    assert_close(compute_omega(model, batches), reference_omega(model, batches))


def test_embedding_sums_a_samples_repeated_tokens_before_the_absolute_value():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(12, 2))
    batch = torch.tensor([[1, 1, 1, 2], [3, 1, 3, 3], [0, 0, 0, 0]])
    got = compute_omega(model, [batch])
    want = reference_omega(model, [batch])
    assert_close(got, want)
    # summing |gradient| per position instead would differ: the test can tell them apart
    per_position = [torch.zeros(6, 3)]
    emb_out = model[0](batch).detach().requires_grad_()
    grad = torch.autograd.grad(model[2](emb_out.flatten(1)).square().sum(), emb_out)[0]
    per_position[0].index_add_(0, batch.reshape(-1), grad.reshape(-1, 3).abs())
    assert (per_position[0] / 3 - want["0.weight"]).abs().max() > 1e-3


class LayoutBySequenceLength(nn.Module):
    """Runs its layers sequence-first, on (T, B, d), when the sequence length is odd and
    batch-first otherwise: the layout of the samples changes with the batch's shape."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        seq_first = x.shape[1] % 2 == 1
        h = self.norm(self.proj(x.transpose(0, 1) if seq_first else x)).tanh()
        return self.out(h.mean(0 if seq_first else 1))


@pytest.mark.parametrize("case", ["layout_by_sequence_length", "transformer_seq_first"])
def test_a_batch_with_another_sequence_length_is_proven_again(case):
    torch.manual_seed(0)
    model = LayoutBySequenceLength() if case == "layout_by_sequence_length" \
        else Transformer(batch_first=False)
    g = torch.Generator().manual_seed(1)
    if case == "layout_by_sequence_length":
        batches = [torch.randn(5, 4, 3, generator=g), torch.randn(5, 5, 3, generator=g),
                   torch.randn(5, 4, 3, generator=g)]  # batch-first, then (5, 5, 3) seq-first
    else:
        batches = [tokens((4, 6), generator=g), tokens((5, 5), generator=g),
                   tokens((3, 7), generator=g)]
    assert_close(compute_omega(model, batches), reference_omega(model, batches))


# ------------------------------------------------------------------ Hugging Face models (tiny)

def tiny_hf(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40,
                                         n_positions=16, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                     intermediate_size=32, vocab_size=40,
                                     max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def padded_batches(g, sizes=(4, 3)):
    """Tokenizer-style dict batches with padding: HF's mask code branches on the mask values,
    which torch.func.vmap cannot run."""
    out = []
    for n in sizes:
        ids = torch.randint(0, 40, (n, 6), generator=g)
        mask = torch.ones(n, 6, dtype=torch.long)
        mask[0, 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.mark.parametrize("sizes", [(4, 3), (4, 4)], ids=["new_signature", "same_signature"])
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hf_model_omega_is_exact_detached_and_batched(kind, sizes):
    """Tied embeddings (GPT-2's wte/lm_head), position embeddings shared by all samples and
    HF's Conv1D take batched paths: exact against the float64 loop, no autograd graph, and no
    warning that a path fell back to one sample at a time. A second batch of the first one's
    signature expands the position embeddings in its only forward."""
    model = tiny_hf(kind)
    batches = padded_batches(torch.Generator().manual_seed(1), sizes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compute_omega(model, batches)
    assert not [w for w in caught if "compute_omega" in str(w.message)]
    for name, omega in got.items():
        assert not omega.requires_grad and omega.grad_fn is None, name
    want = reference_omega(model, batches)
    # a key projection's bias has zero gradient (softmax ignores a shift shared by all keys):
    # both sides hold rounding noise there, compared on the scale of the whole model's Ω
    top = max(w.abs().max().item() for w in want.values())
    zero = {n for n, w in want.items() if w.abs().max().item() < 1e-9 * top}
    assert zero == {n for n in want if n.endswith("key.bias")}
    assert all(got[n].abs().max().item() < 1e-5 * top for n in zero)
    assert_close({n: t for n, t in got.items() if n not in zero},
                 {n: t for n, t in want.items() if n not in zero})


def test_hf_conv1d_has_a_rule():
    model = tiny_hf("gpt2")
    conv1d = model.transformer.h[0].attn.c_attn
    assert type(conv1d).__name__ == "Conv1D"
    assert rule_for(conv1d) is not None


def test_compiled_model_gives_the_original_modules_omega_under_its_own_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    compiled = torch.compile(model)
    batches = [torch.randn(5, 4)]
    got = compute_omega(compiled, batches)
    want = reference_omega(model, batches)
    assert set(got) == {"_orig_mod." + n for n in want}
    assert_close({n[len("_orig_mod."):]: t for n, t in got.items()}, want)


class SharedPositions(nn.Module):
    """Position embeddings of a (1, T) index, shared by every sample; ``reduce`` sums their
    leading dimension instead of broadcasting it, so expanding it to the batch would change F."""

    def __init__(self, reduce):
        super().__init__()
        self.reduce = reduce
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, tokens):
        pos = self.pos(torch.arange(tokens.shape[1]).unsqueeze(0))    # (1, T, 4)
        pos = pos.sum(0) if self.reduce else pos
        return self.out((self.tok(tokens) + pos).tanh()).mean(1)


@pytest.mark.parametrize("reduce", [False, True], ids=["broadcast", "reduced"])
def test_shared_position_embeddings_are_exact_whether_or_not_they_broadcast(reduce):
    """Broadcast over the batch: the expanded second forward; reduced over their leading
    dimension: expanding would change F, which the check sees (the whole-network path)."""
    torch.manual_seed(0)
    model = SharedPositions(reduce)
    # a repeated signature, another one, and the first again
    batches = [tokens((4, 5), vocab=10), tokens((4, 5), vocab=10), tokens((3, 5), vocab=10),
               tokens((4, 5), vocab=10)]
    assert_close(compute_omega(model, batches), reference_omega(model, batches))


def test_a_batch_with_the_previous_signature_runs_one_forward_for_shared_positions():
    """The probe and the expanded second forward are checked once per signature: later batches
    with it expand the position embeddings in their one forward."""
    torch.manual_seed(0)
    model = SharedPositions(reduce=False)
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    compute_omega(model, [tokens((4, 5), vocab=10) for _ in range(3)])
    assert forwards == [4, 2, 4, 4, 4]  # batch 1, its probe, its expanded forward; then one each


def test_batches_of_new_shapes_run_no_forward_in_vain_for_shared_positions():
    """Padding to each batch's longest sequence gives every batch a new signature: each pays
    the probe and the expanded check, and no speculative forward on top."""
    torch.manual_seed(0)
    model = SharedPositions(reduce=False)
    forwards = []
    model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape))
    batches = [tokens((4, 5), vocab=10), tokens((4, 4), vocab=10), tokens((4, 3), vocab=10)]
    got = compute_omega(model, batches)
    assert len(forwards) == 9  # batch, probe, expanded forward: three a batch
    assert_close(got, reference_omega(model, batches))
