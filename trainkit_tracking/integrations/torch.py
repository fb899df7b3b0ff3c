"""DDP helpers: the rank of this process and a Tracker for a torch.distributed job.

Under a process group, ``Tracker.start_run``, ``Run.child`` and ``Tracker.attach`` are
collective: every rank calls them, in the same order. Rank 0 creates the run and
broadcasts its id; the other ranks get a no-op run with the same interface and the
same ``id``. A rank that skips one of these calls (``if rank == 0: run.child(...)``)
leaves the others waiting in the broadcast forever: call them on every rank and let
the no-op run do the gating.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

try:
    import torch
    import torch.distributed as dist
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "trainkit_tracking.integrations.torch needs PyTorch; install it with "
        'pip install "trainkit-tracking[torch]"'
    ) from exc

from trainkit_tracking import Tracker

__all__ = [
    "broadcast_object",
    "init_tracker_for_ddp",
    "is_rank_zero",
    "rank",
    "world_size",
]

T = TypeVar("T")

# torchrun's variables; torch reads them itself, we only check that torchrun set them.
_WORLD_SIZE = "WORLD_SIZE"
_MASTER_ADDR = "MASTER_ADDR"


def rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank: torch.distributed when initialised, else RANK, SLURM_PROCID, ..."""
    return Tracker(environ=os.environ if environ is None else environ).rank


def is_rank_zero(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is rank 0 (the only one that creates and logs runs)."""
    return rank(environ) == 0


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of ranks: torch.distributed when initialised, else WORLD_SIZE (default 1)."""
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get(_WORLD_SIZE, "1") or "1"))
    except ValueError:
        return 1


def broadcast_object(obj: T, src: int = 0) -> T:
    """Give every rank rank ``src``'s ``obj`` (collective); returns ``obj`` without a group.

    Handy for values that only rank 0 knows, e.g. a trial's sampled hyper-parameters.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    payload: list[Any] = [obj]
    dist.broadcast_object_list(payload, src=src)
    result: T = payload[0]
    return result


def init_tracker_for_ddp(
    experiment: str | None = None,
    tracking_uri: str | None = None,
    *,
    backend: str | None = None,
    init_process_group: bool = True,
    **tracker_kwargs: Any,
) -> Tracker:
    """Initialise the process group (when launched by torchrun and not done yet), then a Tracker.

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. The process
    group must exist before the first ``start_run``: that is when the Tracker decides
    the rank and whether run ids are broadcast. Set ``init_process_group=False`` to
    manage the group yourself.

    With a process group, this sets the Tracker up on rank 0 first (store, migrations,
    experiment) while the other ranks wait in a barrier: N ranks migrating a fresh
    sqlite store at once fail with ``table _alembic_tmp_... already exists``.
    """
    launched = _WORLD_SIZE in os.environ and _MASTER_ADDR in os.environ
    if init_process_group and launched and dist.is_available() and not dist.is_initialized():
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=chosen)
    tracker = Tracker(experiment, tracking_uri, **tracker_kwargs)
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_rank() == 0:
                tracker.setup()
        finally:
            # Also when rank 0 failed: the others then try (and report) on their own
            # instead of waiting forever.
            dist.barrier()
    return tracker
