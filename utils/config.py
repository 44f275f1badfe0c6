"""The run's settings: one dataclass, ``Config``, from which everything else is derived.

Each field is one ``train.py`` flag: its help text, parser and default are in the field, its
per-benchmark default (if any) in ``PRESETS``, its per-backbone default in ``ARCH_DEFAULTS``.
``build_parser`` (argparse, ``--help``), ``Config.from_flags`` (a new run),
``Config.to_dict`` (the checkpoint's and results.json's ``config``) and ``Config.resumed``
(the ``--resume`` check) all read these. Adding a flag is adding a field.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from mas_optim.reg_params import parse_accumulate
from model_class import ARCHS
from utils import AppError
from utils import lambda_search
from utils.data import BENCHMARKS
from utils.folders import AUGMENTS, DEFAULT_CACHE_MB, NORMALIZATIONS
from utils.methods import METHODS
from utils.omega_data import parse_omega_data
from utils.optimizers import ADAPTIVE_LR, MOMENTUM, OPTIMIZERS, resolve
from utils.scenarios import SCENARIOS

LR_STEP_EPOCHS = 20  # the original decays the learning rate x0.1 every 20 epochs
LR_GAMMA = 0.1
FOLDERS = "folders"  # the benchmark name of a --data_dir run


@dataclass(frozen=True)
class Preset:
    """Per-benchmark defaults (a flag left out takes these)."""

    arch: str
    hidden: int
    num_epochs: int
    batch_size: int
    init_lr: float
    reg_lambda: float


# Measured with benchmarks/compare_methods.py (README, "Measured"): the digits presets sit well
# inside the proximal step's stable region. With momentum 0.9 the proximal step's pull towards
# theta* is about 10x weaker than the gradient step's at the same lambda (the momentum buffer
# accumulates the task gradient alone), hence lambdas 10x those of the gradient step;
# split-mnist's was scaled so, not measured. "folders" keeps the original repository's batch,
# epochs, lr and lambda (the original's step is --penalty_step gradient).
PRESETS: dict[str, Preset] = {
    "split-digits": Preset("mlp", 256, num_epochs=20, batch_size=16, init_lr=0.02,
                           reg_lambda=3.0),
    "permuted-digits": Preset("mlp", 256, num_epochs=10, batch_size=16, init_lr=0.05,
                              reg_lambda=1.0),
    "split-mnist": Preset("mlp", 256, num_epochs=2, batch_size=64, init_lr=0.05, reg_lambda=1.0),
    # The original's λ 0.01 was applied by the explicit step; with momentum 0.9 the default
    # proximal step holds about 10x more loosely at the same λ, so 0.1 keeps its strength.
    FOLDERS: Preset("alexnet", 256, num_epochs=10, batch_size=8, init_lr=0.001,
                    reg_lambda=0.1),
}
# Per-backbone defaults. A mirrored digit or pixel-permuted image is another input, so only
# AlexNet (natural images, as the original) flips by default. Only AlexNet's inputs are
# normalised by default (with the statistics its ImageNet weights expect): centring digit images
# with their own statistics made every background pixel non-zero and cost 3-6 points of average
# accuracy against the same sequences as built-in benchmarks (pixels in [0, 1]).
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "alexnet": dict(image_size=224, augment="flip", normalize="imagenet", num_freeze_layers=2),
    "cnn": dict(image_size=32, augment="none", normalize="none", num_freeze_layers=0),
    "mlp": dict(image_size=32, augment="none", normalize="none", num_freeze_layers=0),
}
# --data_dir without --arch: AlexNet (as the original) for images of SMALL_IMAGE_PX and more,
# else mlp. On Split Digits written as 28-px PNG folders, with the folder defaults (seeds 0, 1),
# mlp learnt every task (97-98%) where cnn reached chance or 82% (docs/train.md); AlexNet
# upsamples such images to 224 px at 57M parameters.
SMALL_IMAGE_PX = 64
SMALL_IMAGE_ARCH = "mlp"
# How long `python train.py` takes, in --help, README.md and docs/train.md alike (the measured
# runs and their spread are on the speed page, docs/speed.md)
DEFAULT_RUN_TIME = "about 11 s on an idle 2-core CPU, minutes on a busy one"
FOLDERS_ONLY = ("image_size", "augment", "normalize")  # settings of --data_dir images
PENALTY_STEPS = ("proximal", "gradient")


def _number(kind: type, minimum: float, strict: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {minimum}")
        return value
    return parse


def _accumulate(text: str) -> str | float:
    try:
        return parse_accumulate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flag(default: Any, help: str, *, parse: Callable[[str], Any] | None = None,
          choices: tuple[str, ...] | None = None, metavar: str | None = None,
          stored: bool = True, aliases: dict[str, Any] | None = None,
          nargs: str | None = None) -> Any:
    """A field that is a command-line flag. ``stored``: it determines the result, so it is saved
    with the run, written to results.json and must not change on --resume. ``aliases``: extra
    flags that set this field to a fixed value (``{"--proximal": "proximal"}``). ``nargs``:
    argparse's (the parsed value is then a list)."""
    return field(default=default, metadata=dict(help=help, parse=parse, choices=choices,
                                                metavar=metavar, stored=stored,
                                                aliases=aliases or {}, nargs=nargs))


POSITIVE_INT, COUNT = _number(int, 0, True), _number(int, 0, False)
POSITIVE, NON_NEGATIVE = _number(float, 0, True), _number(float, 0, False)


@dataclass(frozen=True)
class Config:
    """Every flag of ``train.py``; ``None`` means "the default of this benchmark/backbone"."""

    benchmark: str | None = _flag(
        None, "built-in task sequence (default split-digits; not with --data_dir): split-digits, "
        "permuted-digits (5 pixel permutations, 10 classes each), split-mnist (needs "
        "--mnist_root)", choices=BENCHMARKS)
    data_dir: str | None = _flag(
        None, "folder with one sub-folder per task (sorted), each holding train/ and test/ in "
        "ImageFolder layout (<split>/<class>/<image>)")
    mnist_root: str | None = _flag(
        None, "for split-mnist: folder holding MNIST/raw/ with MNIST's four idx files")
    arch: str | None = _flag(
        None, "shared backbone (alexnet: AlexNet's features+classifier shared, its last layer "
        "one head per task)", choices=ARCHS)
    image_size: int | None = _flag(
        None, "images are resized to NxN (--data_dir only; alexnet needs >= 63)",
        parse=POSITIVE_INT)
    augment: str | None = _flag(
        None, "random augmentation of --data_dir training images: none, or flip (mirror "
        "left-right at random)", choices=AUGMENTS)
    normalize: str | None = _flag(
        None, "normalisation of --data_dir images: imagenet (ImageNet's statistics), data (the "
        "mean/std of the first task's training images) or none (pixels in [0, 1])",
        choices=NORMALIZATIONS)
    cache_mb: float = _flag(
        DEFAULT_CACHE_MB, "memory (MB) for --data_dir images kept decoded and resized between "
        "epochs; 0 decodes every image at every use (same results, slower)", parse=NON_NEGATIVE,
        metavar="MB", stored=False)
    hidden: int | None = _flag(None, "width of the mlp/cnn backbone", parse=POSITIVE_INT)
    pretrained: str | None = _flag(
        None, "torchvision AlexNet ImageNet weights file (e.g. alexnet-owt-7be5be79.pth); "
        "nothing is downloaded, without it AlexNet trains from scratch", metavar="PATH")
    num_freeze_layers: int | None = _flag(
        None, "freeze the first K conv/linear layers of the shared backbone: neither trained nor "
        "regularised", parse=COUNT)
    num_epochs: int | None = _flag(None, "epochs per task", parse=POSITIVE_INT)
    batch_size: int | None = _flag(None, "batch size", parse=POSITIVE_INT)
    scenario: str = _flag(
        "task", "continual-learning scenario: task (a head per task, task identity at test), "
        "domain (one shared head, no task identity) or class (one head over every class seen "
        "so far, growing; no task identity at test); see docs/scenarios.md",
        choices=SCENARIOS)
    optimizer: str = _flag(
        "sgd", f"sgd (momentum {MOMENTUM}, the penalty inside its step: mas_optim.LocalSgd), "
        "adam or adamw (torch's, the penalty's gradient added by mas_optim.add_mas_penalty)",
        choices=OPTIMIZERS)
    init_lr: float | None = _flag(
        None, f"initial learning rate, x{LR_GAMMA} every {LR_STEP_EPOCHS} epochs (adam/adamw: "
        f"{ADAPTIVE_LR})", parse=POSITIVE)
    reg_lambda: float | str | None = _flag(
        None, "MAS penalty strength lambda in lambda*sum(Omega*(theta-theta*)^2); 0 is plain "
        "fine-tuning; 'auto' chooses it per task on a validation split of the task's training "
        "data (De Lange et al. 2021); several values run a sweep, one run each in "
        "OUTPUT_DIR/lambda_<value>/, with sweep.json and sweep.png",
        parse=lambda_search.parse_lambda, metavar="LAMBDA", nargs="+")
    auto_measure: str | None = _flag(
        None, "with --reg_lambda auto: the validation score compared with fine-tuning's: "
        "likelihood (100 x exp(-mean cross-entropy)) or accuracy (the paper's) (default "
        f"{lambda_search.DEFAULTS['auto_measure']})", choices=lambda_search.MEASURES)
    auto_margin: float | None = _flag(
        None, "with --reg_lambda auto: accept the first lambda whose validation score is at "
        f"least (1 - P) x that of fine-tuning (default {lambda_search.DEFAULTS['auto_margin']})",
        parse=lambda_search.MARGIN, metavar="P")
    auto_start: float | None = _flag(
        None, "with --reg_lambda auto: the first (highest) lambda tried (default "
        f"{lambda_search.DEFAULTS['auto_start']:g})", parse=lambda_search.START, metavar="L")
    auto_factor: float | None = _flag(
        None, "with --reg_lambda auto: lambda is multiplied by this while the validation "
        f"score is too low (default {lambda_search.DEFAULTS['auto_factor']:.3g}: two a decade)",
        parse=lambda_search.FACTOR_OR_FRACTION, metavar="A")
    auto_tries: int | None = _flag(
        None, "with --reg_lambda auto: lambda values tried at most after fine-tuning; the last, "
        "start x factor^(N-1), is kept when none reaches the margin (default "
        f"{lambda_search.DEFAULTS['auto_tries']}; with the default start and factor, down to 1)",
        parse=POSITIVE_INT, metavar="N")
    auto_val_fraction: float | None = _flag(
        None, "with --reg_lambda auto: fraction of each task's training data held out for the "
        f"search (default {lambda_search.DEFAULTS['auto_val_fraction']})",
        parse=lambda_search.FACTOR_OR_FRACTION, metavar="F")
    auto_fit: str | None = _flag(
        None, "with --reg_lambda auto: search before every task from the second, or before the "
        "second only and keep that lambda (Lee et al. 2024) (default every)",
        choices=lambda_search.FITS)
    penalty_step: str | None = _flag(
        None, "how the penalty is applied. --optimizer sgd: proximal (the default: torch's SGD "
        "step on the task loss, then the penalty's exact proximal map; stable for any "
        "reg_lambda) or gradient (the paper's explicit step 2*reg_lambda*Omega*(theta-theta*), "
        "which diverges once 2*lr*reg_lambda*Omega > 2); adam/adamw: gradient only, their "
        "default",
        choices=PENALTY_STEPS, aliases={"--proximal": "proximal"})
    method: str = _flag(
        "mas", "importance Omega after each task: " + ", ".join(
            f"{name} ({m.help})" for name, m in METHODS.items()), choices=tuple(METHODS))
    omega: str = _flag(
        "per-sample", "importance: mean over samples of |d||f(x)||^2/dtheta| (per-sample, the "
        "paper's Eq. 2) or from the gradient of whole batches (faster, coarser)",
        choices=("per-sample", "batch"))
    omega_data: str = _flag(
        "train", "inputs the importance Omega is computed on (no labels needed): train (the "
        "task's training inputs), test (its test inputs) or DIR (every image under DIR, for "
        "every task, preprocessed as the run's images)", parse=parse_omega_data,
        metavar="train|test|DIR")
    accumulate: str | float = _flag(
        "sum", "how Omega of a new task joins the old: 'sum' (the paper) or alpha in [0,1] for "
        "a running average", parse=_accumulate)
    seed: int = _flag(0, "seed for initialisation and data order", parse=int)
    # not a flag: how --data_dir images become inputs (utils.folders.Preprocessing.to_dict(), with
    # the normalisation statistics of the first task), fixed when the run starts
    preprocessing: dict[str, Any] | None = field(default=None, metadata=dict(stored=True))
    output_dir: str = _flag(
        "models", "where shared_model.pth, reg_params.pickle, Task_k/, results.json, "
        "accuracy.png and checkpoint.pth go", stored=False)
    resume: bool = _flag(
        False, "continue the run in --output_dir from its last checkpoint (finished tasks are "
        "not redone; on a finished run just print its report)", stored=False)
    overwrite: bool = _flag(False, "start a new run even if --output_dir holds one", stored=False)
    fsdp: bool = _flag(
        False, "under torchrun: shard the model, the optimizer state and Omega/theta* over the "
        "processes (FSDP2 fully_shard; each holds 1/N of them) instead of replicating them "
        "(DistributedDataParallel); the checkpoint and files are the same either way",
        stored=False)
    use_gpu: bool = _flag(
        False, "train on the CUDA GPU (under torchrun: cuda:LOCAL_RANK, NCCL)", stored=False)

    @classmethod
    def stored_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata["stored"]]

    def to_dict(self) -> dict[str, Any]:
        """The settings that determine the result (the checkpoint's and results.json's)."""
        return {name: getattr(self, name) for name in self.stored_names()}

    @classmethod
    def from_flags(cls, given: dict[str, Any]) -> "Config":
        """A new run: the flags given, then the benchmark's and the backbone's defaults."""
        if given.get("data_dir") is not None and given.get("benchmark") is not None:
            raise AppError("give either --benchmark or --data_dir, not both")
        benchmark = FOLDERS if given.get("data_dir") is not None else (
            given.get("benchmark") or "split-digits")
        for name in FOLDERS_ONLY:
            if benchmark != FOLDERS and given.get(name) is not None:
                raise AppError(f"--{name} applies to --data_dir images only")
        preset = PRESETS[benchmark]
        arch = given.get("arch") or preset.arch
        if given.get("pretrained") is not None and arch != "alexnet":
            raise AppError("--pretrained holds AlexNet weights: use it with --arch alexnet")
        by_arch = {k: v for k, v in ARCH_DEFAULTS[arch].items()
                   if k not in FOLDERS_ONLY or benchmark == FOLDERS}
        values = lambda_search.settle(
            {**asdict(preset), **by_arch, **given, "benchmark": benchmark, "arch": arch})
        if not METHODS[values.get("method", "mas")].penalty:
            if given.get("reg_lambda"):
                raise AppError(f"--method {values['method']} has no penalty: drop --reg_lambda")
            values["reg_lambda"] = 0.0
        return cls(**resolve(given, values))

    @classmethod
    def resumed(cls, stored: Any, given: dict[str, Any], where: str) -> "Config":
        """The stored settings of the run in ``where``; refuse given flags that differ."""
        names = cls.stored_names()
        if isinstance(stored, dict):  # a run started before a setting existed ran without it
            stored = {**_legacy(stored), **stored}
        missing = [k for k in names if not isinstance(stored, dict) or k not in stored]
        if missing:
            raise AppError(f"{where}: settings missing ({', '.join(missing)})")
        for key in names:
            if key in given and given[key] != stored[key]:
                raise AppError(f"--resume: {where} was started with --{key} {stored[key]}, not "
                               f"{given[key]} (drop the flag, or use another --output_dir)")
        return cls(**{k: stored[k] for k in names},
                   **{k: v for k, v in given.items() if k not in names})


def _legacy(stored: dict[str, Any]) -> dict[str, Any]:
    """The settings added after the first release, as a run started before them ran."""
    auto = stored.get("reg_lambda") == lambda_search.AUTO
    return {"scenario": "task", "optimizer": "sgd", "omega_data": "train",
            **{k: None for k in lambda_search.DEFAULTS},
            **({"auto_measure": "accuracy", "auto_tries": 10} if auto else {})}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as ONE line (exit 2), like every other input error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _default_text(name: str, default: Any) -> str:
    if name in Preset.__dataclass_fields__:
        return ", ".join(f"{'--data_dir' if b == FOLDERS else b} {getattr(p, name)}"
                         for b, p in PRESETS.items())
    if name in ARCH_DEFAULTS["mlp"]:
        return ", ".join(f"{arch} {d[name]}" for arch, d in ARCH_DEFAULTS.items())
    return "" if default in (None, False) else str(default)


def build_parser() -> argparse.ArgumentParser:
    """The command line, from ``Config``'s fields. Flags left out are absent from the parsed
    namespace (``argparse.SUPPRESS``): what --resume checks is what the user typed."""
    parser = _Parser(prog="train.py", argument_default=argparse.SUPPRESS, allow_abbrev=False,
                     description=(
        "Train a sequence of tasks with Memory Aware Synapses (Aljundi et al., ECCV 2018) and "
        "report forgetting. Without arguments: Split Digits (scikit-learn digits, 5 tasks of 2 "
        f"digits): {DEFAULT_RUN_TIME}."))
    for f in fields(Config):
        meta = f.metadata
        if "help" not in meta:  # not a flag
            continue
        default = _default_text(f.name, f.default)
        help_text = meta["help"] + (f" (default {default})" if default else "")
        if f.default is False:
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=meta["parse"], choices=meta["choices"],
                                metavar=meta["metavar"], nargs=meta["nargs"], help=help_text)
        for alias, value in meta["aliases"].items():
            parser.add_argument(alias, dest=f.name, action="store_const", const=value,
                                help=f"the same as --{f.name} {value}")
    return parser
