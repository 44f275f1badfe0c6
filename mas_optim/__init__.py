"""mas-optim: Memory Aware Synapses (Aljundi et al., ECCV 2018) as PyTorch optimizers.

Learn a sequence of tasks without forgetting the earlier ones:

* :class:`LocalSgd` - drop-in ``torch.optim.SGD`` that adds the MAS penalty gradient
  2λΩ(θ − θ*) inside ``step()``; :func:`add_mas_penalty` - the same penalty for any torch
  optimizer (Adam, AdamW, RMSprop, ...);
* :func:`compute_omega` (and :class:`OmegaSgd`) - the importance Ω after each task;
* :func:`init_reg_params`, :func:`consolidate_reg_params`, :func:`save_reg_params`,
  :func:`load_reg_params` - what is remembered between tasks, keyed by parameter name;
* :mod:`mas_optim.functional` - the update itself over lists of tensors (``mas_sgd``,
  ``add_penalty_``, ``proximal_``) and ``implementation()``, which says which implementation
  runs and why.

LocalSgd, add_mas_penalty, compute_omega and the reg_params functions take models sharded by
FSDP2's ``fully_shard`` too: Ω and θ* are then sharded like the parameters
(:mod:`mas_optim.sharded`, imported on first use).
"""

from . import functional
from .atomic import atomic_write
from .growth import grow_reg_params
from .importance import compute_omega
from .local_sgd import LocalSgd
from .omega_sgd import OmegaSgd
from .penalty import MasPenalty, add_mas_penalty
from .reg_params import (
    RegParamsError,
    consolidate_reg_params,
    init_reg_params,
    load_reg_params,
    save_reg_params,
)
from .selection import LambdaSelection, select_reg_lambda, stability_decay

__version__ = "0.2.0"

__all__ = [
    "LambdaSelection",
    "LocalSgd",
    "MasPenalty",
    "OmegaSgd",
    "RegParamsError",
    "add_mas_penalty",
    "atomic_write",
    "compute_omega",
    "consolidate_reg_params",
    "functional",
    "grow_reg_params",
    "init_reg_params",
    "load_reg_params",
    "save_reg_params",
    "select_reg_lambda",
    "stability_decay",
    "__version__",
]
