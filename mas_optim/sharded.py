r"""MAS on sharded parameters (FSDP2 ``fully_shard``): Ω and θ* sharded like the parameters.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor``: each rank holds
one slice (``p.to_local()``), placed by the parameter's device mesh and placements (``Shard(0)``
for FSDP). MAS keeps two parameter-sized tensors per regularised parameter, Ω and θ*; here they
are ``DTensor``\ s with exactly the parameter's mesh and placements, so each rank holds the slice
of Ω and θ* that matches its slice of θ:

* the penalty λ Σ Ω (θ − θ*)² (Eq. 3) and its gradient 2λΩ(θ − θ*) are elementwise, so an
  optimizer step runs on the local slices alone, with no communication;
* :func:`compute_omega_sharded` gives each rank only its slice of Ω (Eq. 2 over the data of all
  ranks, reduce-scattered);
* :func:`full_reg_params` gathers the slices to full tensors, the form ``reg_params.pickle``
  stores, so a file is independent of the number of ranks that wrote it, and
  :func:`shard_reg_params_like` cuts a loaded file to this rank's slices without communication.

This module sits on top of :mod:`mas_optim.reg_params` and :mod:`mas_optim.importance` (which
hold the code, and never import it): the FSDP2 API in one place. ``mas_optim.compute_omega``,
``save_reg_params`` and ``load_reg_params(model=)`` take sharded models directly.
"""

from ._validate import is_sharded
from .importance.fsdp import compute_omega_sharded
from .reg_params import full_reg_params, shard_reg_params_like

__all__ = ["compute_omega_sharded", "full_reg_params", "is_sharded", "shard_reg_params_like"]
