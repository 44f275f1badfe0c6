"""MAS inside training frameworks: thin adapters over the public API, one per framework.

* :mod:`mas_optim.integrations.hf` - a ``transformers.TrainerCallback``;
* :mod:`mas_optim.integrations.lightning` - a ``lightning.pytorch.Callback``;
* :mod:`mas_optim.avalanche` - an Avalanche strategy plugin.

Each imports its framework, which ``import mas_optim`` never does (``pip install
mas-optim[hf]``, ``[lightning]``, ``[avalanche]``). What they share - reg_params across tasks,
Ω after each task, the penalty on whatever optimizer the framework built - is
:class:`~mas_optim.integrations.tasks.MasTasks`.
"""
