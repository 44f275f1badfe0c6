from pathlib import Path

from setuptools import find_packages, setup

version = {}
for line in (Path(__file__).parent / "mas_optim" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="mas-optim",
    version=version["__version__"],
    description="Memory Aware Synapses (MAS) for continual learning as PyTorch optimizers",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    packages=find_packages(include=["mas_optim", "mas_optim.*"]),
    # The one-pass CPU kernels, compiled at first use (mas_optim/_kernels.py).
    package_data={"mas_optim": ["csrc/*.c"]},
    python_requires=">=3.9",
    # torch 2.6 is the first with named parameters in optimizers (LocalSgd keys reg_params by
    # name). Tested with torch 2.14.1 and torchvision 0.29.1.
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        # train.py, model_class.py and utils/ (the application around the library)
        "train": ["torchvision>=0.21", "scikit-learn", "matplotlib", "tqdm"],
        # the tests: the framework tests (tests/test_integrations_*.py,
        # test_framework_checkpoints.py, test_examples.py, the PEFT and Hugging Face cases of
        # test_reg_params.py and test_importance_models.py) need hf, peft, lightning and avalanche, and
        # tests/test_docs.py builds docs/ with mkdocs + mkdocstrings (--strict). Tested with
        # transformers 5.25, accelerate 1.16, peft 0.21, lightning 2.6, mkdocs 1.6.
        "test": ["pytest", "hypothesis", "torchvision>=0.21", "scikit-learn",
                 "matplotlib", "tqdm", "transformers", "accelerate", "peft", "lightning",
                 "mkdocs>=1.6", "mkdocstrings[python]>=0.27", "avalanche-lib>=0.6"],
        # mas_optim.integrations.hf.MasCallback (Trainer needs accelerate)
        "hf": ["transformers", "accelerate"],
        # LoRA adapters with reg_params (docs/frameworks.md)
        "peft": ["peft"],
        # mas_optim.integrations.lightning.MasCallback
        "lightning": ["lightning"],
        # mas_optim.avalanche.MasPlugin
        "avalanche": ["avalanche-lib>=0.6"],
    },
)
