"""The distributed rank of this process, and the broadcast that gives every rank one run id."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from trainkit_tracking._core import env as _env


def _dist() -> Any | None:
    # Only look at torch.distributed if the user's code imported it: never import torch here.
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return None
    try:
        if dist.is_available() and dist.is_initialized():
            return dist
    except Exception:  # a broken or partial torch install must not break tracking
        return None
    return None


def process_group_active() -> bool:
    """Whether a torch.distributed process group is initialised in this process."""
    return _dist() is not None


def current_rank(environ: Mapping[str, str]) -> int:
    """Rank from torch.distributed when initialised, else RANK, SLURM_PROCID, ... (default 0)."""
    dist = _dist()
    if dist is not None:
        return int(dist.get_rank())
    for name in _env.RANK_VARS:
        value = _env.read_int(environ, name)  # a malformed rank is an error, never skipped
        if value is not None:
            return value
    return 0


def broadcast_run_id(run_id: str | None) -> str | None:
    """Give every rank rank 0's run id (a collective call when a process group exists)."""
    dist = _dist()
    if dist is None:
        return run_id
    payload: list[str | None] = [run_id]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]
