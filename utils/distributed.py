"""``torchrun`` support: the process group, rank-0-only output, and agreement points.

``train.py`` runs data-parallel when started by ``torchrun`` (which sets ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE``); without those it is one process and every method here is a
no-op (or the identity).

Rules the application keeps under ``torchrun``:

* only rank 0 writes files and prints; every rank computes the same state;
* every rank reads the same committed files, and no rank reads a file before rank 0 committed
  it: the writes happen inside :meth:`Dist.error_barrier` blocks, which end with a collective;
* an ``AppError`` on any rank inside a :meth:`Dist.error_barrier` block is raised on *every*
  rank at the block's end (so all of them exit with code 2 and one line, printed by rank 0), never a hang;
  the same holds for the checks whose outcome is the same on every rank by construction
  (parameters, penalty and Omega are identical on all ranks; the loss is gathered first). An
  error only one rank can see outside such a block (an unreadable image in its shard) is
  printed by that rank, which exits 2; torchrun then stops the others.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import signal
from contextlib import contextmanager
from typing import Iterator, TypeVar

import torch
from torch import nn

from utils import AppError

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
EXIT_BARRIER_S = 60  # how long a failing rank waits for the others before it exits


E = TypeVar("E", bound=AppError)


def everywhere(error: E) -> E:
    """Mark ``error`` as raised on every rank at the same point (rank 0 alone prints it)."""
    error.everywhere = True  # type: ignore[attr-defined]
    return error


def is_everywhere(error: BaseException) -> bool:
    return bool(getattr(error, "everywhere", False))


class Dist:
    """Where this process stands: rank, world size, device; one process when not under torchrun."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0,
                 active: bool = False) -> None:
        self.rank, self.world, self.local_rank, self.active = rank, world, local_rank, active
        self.device = torch.device("cpu")
        self.control = None  # a gloo group of all ranks for the agreements (not DDP's traffic)

    @classmethod
    def from_env(cls) -> "Dist":
        """Under torchrun (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` set): that rank; else one
        process. Nothing is initialised yet (see :meth:`start`)."""
        if not all(k in os.environ for k in ENV_KEYS):
            return cls()
        try:
            rank, local_rank, world = (int(os.environ[k]) for k in ENV_KEYS)
        except ValueError:
            raise AppError("torchrun environment: RANK, LOCAL_RANK and WORLD_SIZE must be "
                           "integers") from None
        if not (world >= 1 and 0 <= rank < world and local_rank >= 0):
            raise AppError(f"torchrun environment: RANK {rank} / WORLD_SIZE {world} is not a "
                           f"valid rank")
        return cls(rank, world, local_rank, active=True)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    # --- set-up and tear-down ------------------------------------------------------------------
    def start(self, use_gpu: bool) -> torch.device:
        """Pick the device and, under torchrun, join the process group: gloo on the CPU;
        NCCL for CUDA tensors (``cuda:LOCAL_RANK``) plus gloo for the CPU-side agreements when
        ``--use_gpu``."""
        if use_gpu and not torch.cuda.is_available():
            raise everywhere(AppError("--use_gpu: no CUDA GPU is available"))
        if not self.active:
            self.device = torch.device("cuda" if use_gpu else "cpu")
            return self.device
        import torch.distributed as dist

        if not dist.is_available():
            raise AppError("torchrun: this torch build has no torch.distributed")
        if use_gpu:
            if self.local_rank >= torch.cuda.device_count():
                raise AppError(f"--use_gpu: LOCAL_RANK {self.local_rank} but only "
                               f"{torch.cuda.device_count()} CUDA GPU(s) on this machine (start "
                               f"at most that many processes per node)")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            backend = "cpu:gloo,cuda:nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world)
        self.control = dist.new_group(backend="gloo")
        return self.device

    def close(self) -> None:
        """Leave the process group (always, also after an error)."""
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def after_error(self, error: AppError) -> None:
        """On the way out with exit code 2, after the error line was printed. For an error
        raised on every rank, wait (bounded) until every rank got here, so that no rank exits
        -- and makes torchrun stop the others -- before rank 0 printed the line. From here on
        this process is leaving with code 2 anyway: the SIGTERM torchrun sends once a rank has
        left is ignored, so that every rank reports the same code 2 (torchrun's SIGKILL after
        its grace period still applies)."""
        if not self.active:
            return
        import torch.distributed as dist

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if is_everywhere(error) and dist.is_initialized() and self.control is not None:
            try:
                dist.monitored_barrier(self.control,
                                       timeout=datetime.timedelta(seconds=EXIT_BARRIER_S))
            except Exception:  # noqa: BLE001  # a rank that is gone: leave all the same
                pass

    # --- agreement -----------------------------------------------------------------------------
    def agree(self, error: AppError | None) -> None:
        """A collective: raise ``AppError`` on every rank if any rank had one (the message of
        the lowest such rank); return on every rank otherwise. Also a barrier."""
        import torch.distributed as dist

        if not self.active or not dist.is_initialized():
            if error is not None:
                raise error
            return

        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, None if error is None else str(error),
                               group=self.control)
        for rank, message in enumerate(messages):
            if message is not None:
                raise everywhere(AppError(message if rank == 0
                                          else f"(on rank {rank}) {message}"))

    @contextmanager
    def error_barrier(self) -> Iterator[None]:
        """``with dist.error_barrier(): ...``: a barrier at the block's end that also carries
        errors: the block's ``AppError`` (on any rank) ends the block on every rank with it. Blocks must not contain collectives of their own that a
        failing rank could skip (apart from those that all ranks reach before any can fail)."""
        error: AppError | None = None
        try:
            yield
        except AppError as exc:
            error = exc
        self.agree(error)

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value`` (picklable), in rank order; ``[value]`` for one process."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        values: list[object] = [None] * self.world
        dist.all_gather_object(values, value, group=self.control)
        return values

    def sum_counts(self, *counts: int) -> tuple[int, ...]:
        """Integer counts summed over ranks (exact)."""
        if not self.active:
            return counts
        return tuple(sum(c) for c in zip(*self.gather(counts)))  # type: ignore[arg-type]

    def check_same(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        """Every rank must hold bit-identical ``tensors`` (DDP's averaged gradients make the
        parameters, the optimizer state and hence Omega the same everywhere); a difference is
        a bug, and is refused before anything is committed."""
        if not self.active:
            return
        digest = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            digest.update(name.encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        digests = self.gather(digest.hexdigest())
        if len(set(digests)) != 1:  # every rank sees all digests: every rank raises
            raise everywhere(AppError(
                f"the {self.world} processes disagree on {what} (they should be bit-identical "
                f"under DistributedDataParallel); nothing was committed"))

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train through: DistributedDataParallel under torchrun, else itself."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
