"""Speed (and memory) of the importance pass, as ratios against baselines measured in the same run.

Exact per-sample compute_omega against the batch formula (per_sample=False), against
``torch.func`` (vmap of grad over the whole model, in chunks of CHUNK samples) and, on the MLP
and small CNN, against the batch-size-1 loops Eq. 2 otherwise needs (autograd.grad per sample,
and the original code's backward + OmegaSgd.step).

Peak memory: each pass runs in a fresh subprocess and reports the growth of its peak resident set
during the pass (VmHWM from /proc/self/status after the pass minus before it; no psutil needed).

CPU time of this process (`_timing.paired` with clock=time.process_time), one thread, medians of
paired repeats. Run:  python benchmarks/bench_importance.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

import mas_optim

try:
    from benchmarks._timing import paired
except ImportError:  # run as a script from benchmarks/
    from _timing import paired

CHUNK = 8          # samples per torch.func.vmap call in the baseline
SAMPLES, BATCH = 64, 32


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


class Transformer(nn.Module):
    """Embedding + 2-layer TransformerEncoder (d 128, batch_first) + LayerNorm, mean-pooled."""

    def __init__(self, vocab: int = 1000, d: int = 128) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.encoder(self.emb(tokens))).mean(1))


class TextConv(nn.Module):
    """Embedding + Conv1d + GroupNorm text classifier."""

    def __init__(self, vocab: int = 1000, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, 128, 5, padding=2)
        self.norm = nn.GroupNorm(8, 128)
        self.out = nn.Linear(128, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(self.emb(tokens).transpose(1, 2))).relu()
        return self.out(h.mean(2))


class Recurrent(nn.Module):
    """Embedding + LSTM (1 layer) or GRU (2 layers), hidden 128, classifier on the mean."""

    def __init__(self, kind: str, vocab: int = 1000, d: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = (nn.LSTM(d, 128, batch_first=True) if kind == "lstm"
                    else nn.GRU(d, 128, num_layers=2, batch_first=True))
        self.out = nn.Linear(128, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.emb(tokens))[0].mean(1))


def resnet18() -> nn.Module:
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


MODELS: Dict[str, Callable[[], tuple]] = {
    "resnet18 32x32": lambda: (resnet18(), torch.randn(SAMPLES, 3, 32, 32)),
    "transformer d128 T32": lambda: (Transformer(), torch.randint(0, 1000, (SAMPLES, 32))),
    "Conv1d+GroupNorm T64": lambda: (TextConv(), torch.randint(0, 1000, (SAMPLES, 64))),
    "LSTM h128 T32": lambda: (Recurrent("lstm"), torch.randint(0, 1000, (SAMPLES, 32))),
    "GRU 2x h128 T32": lambda: (Recurrent("gru"), torch.randint(0, 1000, (SAMPLES, 32))),
}


def vmap_omega(model: nn.Module, loader, chunk: int = CHUNK) -> Dict[str, torch.Tensor]:
    """Eq. 2 by torch.func: vmap(grad) of ‖F(x_k)‖² over chunks of samples."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}

    def loss(p, x):
        return torch.func.functional_call(model, p, (x.unsqueeze(0),)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
    model.eval()
    for (x,) in loader:
        for s in range(0, len(x), chunk):
            for n, g in per_sample(params, x[s:s + chunk]).items():
                acc[n].add_(g.abs().sum(0))
    return acc


def _loader(xs: torch.Tensor, batch: int):
    return [(xs[i:i + batch],) for i in range(0, len(xs), batch)]


def vmap_runs(model: nn.Module, loader) -> Optional[str]:
    """None if the vmap baseline runs on this model, else the first line of why not."""
    try:
        vmap_omega(model, loader[:1])
        return None
    except Exception as e:  # noqa: BLE001 - reported in the table
        return str(e).strip().splitlines()[0][:60]


def bench_model(label: str, repeats: int) -> str:
    torch.manual_seed(0)
    model, xs = MODELS[label]()
    loader = _loader(xs, BATCH)
    fns = {
        "batch formula": lambda: mas_optim.compute_omega(model, loader, per_sample=False),
        "ours": lambda: mas_optim.compute_omega(model, loader),
    }
    why = vmap_runs(model, loader)
    if why is None:
        fns["vmap"] = lambda: vmap_omega(model, loader)
    for f in fns.values():
        f()
    r = paired(fns, repeats, 1, clock=time.process_time)
    vs = (f"vmap {r['vmap']:.2f}x   ours/vmap {r['ours'] / r['vmap']:.2f}" if why is None
          else f"vmap fails ({why})")
    return (f"  {label:22s} batch formula {r['baseline_ms']:7.1f} ms   exact (ours) "
            f"{r['ours']:.2f}x   {vs}")


def _peak_child(label: str, which: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, xs = MODELS[label]()
    loader = _loader(xs, 64)
    run = {"batch": lambda: mas_optim.compute_omega(model, loader, per_sample=False),
           "ours": lambda: mas_optim.compute_omega(model, loader),
           "vmap": lambda: vmap_omega(model, loader),
           "vmap1": lambda: vmap_omega(model, loader, chunk=1)}[which]
    before = _peak_rss_kib()
    run()
    print(json.dumps({"kib": _peak_rss_kib() - before}))


def _peak_rss_kib() -> int:
    """This process's peak resident set: VmHWM (Linux; reset by exec, unlike ru_maxrss, which a
    child inherits from the parent that forked it), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory(label: str) -> Dict[str, float]:
    out = {}
    for which in ("batch", "ours", "vmap", "vmap1"):
        res = subprocess.run([sys.executable, __file__, "--peak", label, which],
                             capture_output=True, text=True, check=True)
        out[which] = json.loads(res.stdout.strip().splitlines()[-1])["kib"] / 1024
    return out


def bench_small(repeats: int) -> None:
    print("Importance pass, 512 samples, batch 128: time / time(batch formula)")
    torch.manual_seed(0)
    cases = (("MLP 784-400-400-10", mlp(400), torch.randn(512, 784)),
             ("small CNN (2 conv + 2 fc, 28x28)", small_cnn(), torch.randn(512, 1, 28, 28)))
    for label, model, xs in cases:
        loader = _loader(xs, 128)
        params = [p for p in model.parameters() if p.requires_grad]

        def batch_size_one_loop():  # Eq. 2 with batch size 1, at its cheapest: autograd.grad
            model.eval()
            acc = [torch.zeros_like(p) for p in params]
            for i in range(len(xs)):
                grads = torch.autograd.grad(model(xs[i:i + 1]).pow(2).sum(), params)
                for a, g in zip(acc, grads):
                    a.add_(g.abs())

        def omega_sgd_loop():  # Eq. 2 as the original code gets it: backward + optimizer step
            model.eval()
            opt = mas_optim.OmegaSgd(model.named_parameters())
            for i in range(len(xs)):
                opt.zero_grad()
                model(xs[i:i + 1]).pow(2).sum().backward()
                opt.step()

        fns = {"batch formula": lambda: mas_optim.compute_omega(model, loader, per_sample=False),
               "per-sample": lambda: mas_optim.compute_omega(model, loader),
               "batch-size-1 loop": batch_size_one_loop, "OmegaSgd loop": omega_sgd_loop}
        for f in fns.values():
            f()
        r = paired(fns, repeats, 1, clock=time.process_time)
        loop, original = r["batch-size-1 loop"], r["OmegaSgd loop"]
        print(f"  {label}: batch formula {r['baseline_ms']:.1f} ms; per-sample "
              f"{r['per-sample']:.2f}x; batch-size-1 loops: autograd.grad {loop:.2f}x, "
              f"OmegaSgd {original:.2f}x (per-sample is {loop / r['per-sample']:.1f}x and "
              f"{original / r['per-sample']:.1f}x faster)")


def hf_models():
    """A tiny GPT-2 and BERT from configs (random init, nothing downloaded), with dict batches
    of 64 sequences of 16 tokens whose attention masks pad some of them."""
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=32, bos_token_id=0,
        eos_token_id=0))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
        vocab_size=1000, max_position_embeddings=32, num_labels=4))
    ids = torch.randint(0, 1000, (SAMPLES, 16))
    mask = torch.ones(SAMPLES, 16, dtype=torch.long)
    mask[::3, 12:] = 0
    data = [{"input_ids": ids[i:i + BATCH], "attention_mask": mask[i:i + BATCH]}
            for i in range(0, SAMPLES, BATCH)]
    return {"GPT-2 2x64 (tied wte)": gpt2, "BERT 2x64": bert}, data


def bench_hf(repeats: int) -> None:
    print(f"\nHugging Face models, {SAMPLES} padded sequences of 16 tokens, batch {BATCH}: "
          "time / time(batch formula)")
    torch.manual_seed(0)
    models, data = hf_models()
    for label, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]

        def batch_size_one_loop():  # Eq. 2 with batch size 1, at its cheapest: autograd.grad
            model.eval()
            for b in data:
                for k in range(len(b["input_ids"])):
                    out = model(**{key: t[k:k + 1] for key, t in b.items()}).logits
                    torch.autograd.grad(out.square().sum(), params, allow_unused=True)

        fns = {"batch formula": lambda: mas_optim.compute_omega(model, data, per_sample=False),
               "exact": lambda: mas_optim.compute_omega(model, data),
               "loop": batch_size_one_loop}
        for f in fns.values():
            f()
        r = paired(fns, repeats, 1, clock=time.process_time)
        print(f"  {label:22s} batch formula {r['baseline_ms']:6.1f} ms   exact {r['exact']:.2f}x"
              f"   batch-size-1 loop {r['loop']:.2f}x", flush=True)


def main(repeats: int, quick: bool = False) -> None:
    bench_small(1 if quick else max(3, repeats // 3))
    print(f"\nImportance pass, {SAMPLES} samples, batch {BATCH}: time / time(batch formula); "
          f"vmap = torch.func vmap(grad) in chunks of {CHUNK}")
    for label in MODELS:
        print(bench_model(label, max(1, repeats // 5) if quick else max(3, repeats // 3)),
              flush=True)
    bench_hf(max(1, repeats // 5) if quick else max(3, repeats // 3))
    if quick:
        print("\n(peak memory: left out with --quick)")
        return
    mem = peak_memory("resnet18 32x32")
    print(f"\nPeak memory growth, resnet18 32x32, one batch of 64: batch formula "
          f"{mem['batch']:.0f} MiB, exact (ours) {mem['ours']:.0f} MiB, vmap in chunks of "
          f"{CHUNK} {mem['vmap']:.0f} MiB, vmap one sample at a time {mem['vmap1']:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats (default 15)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--hf", action="store_true", help="the Hugging Face models only")
    parser.add_argument("--peak", nargs=2, metavar=("MODEL", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.peak:
        _peak_child(*args.peak)
    elif args.hf:
        bench_hf(args.repeats)
    else:
        main(3 if args.quick else args.repeats, args.quick)
