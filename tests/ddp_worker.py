"""Worker for test_integration_torch: run by torchrun with 2 ranks (gloo on CPU).

Creates one hpo_trial run and one hpo_trial_fold child per fold, trains a tiny DDP
model in each fold, logs a metric whose value names the rank, and prints one JSON line
with the ids this rank sees.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainkit_tracking import RunSpec
from trainkit_tracking.integrations.torch import init_tracker_for_ddp, is_rank_zero, rank

FOLDS = 2


def main() -> None:
    tracker = init_tracker_for_ddp("ddp-test", backend="gloo")
    assert dist.is_initialized()
    spec = RunSpec(
        kind="hpo_trial", model="tiny", environment="local", study_key_hash="ab" * 8, trial_number=0
    )
    me = rank()
    fold_ids = []
    with tracker.start_run(spec) as trial_run:
        for fold in range(FOLDS):
            # Every rank calls child(): it is collective (rank 0 creates, all get its id).
            with trial_run.child("hpo_trial_fold", fold_idx=fold) as fold_run:
                torch.manual_seed(fold)
                model = DistributedDataParallel(torch.nn.Linear(4, 1))
                optim = torch.optim.SGD(model.parameters(), lr=0.1)
                for step in range(3):
                    x = torch.randn(8, 4)
                    loss = model(x).pow(2).mean()
                    optim.zero_grad()
                    loss.backward()
                    optim.step()
                    # 100 + rank: a metric logged by rank 1 would be visible as 101.
                    fold_run.log_metrics({"rank_marker": 100 + me, "loss": loss.item()}, step=step)
                fold_run.log_params({"logged_by_rank": me})
                fold_ids.append(fold_run.id)
        trial_run.log_metric("rank_marker", 100 + me)
        trial_run.set_tags({"written_by_rank": str(me)})
    print(
        json.dumps(
            {
                "rank": me,
                "is_rank_zero": is_rank_zero(),
                "run_id": trial_run.id,
                "run_type": type(trial_run).__name__,
                "fold_ids": fold_ids,
            }
        ),
        flush=True,
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's teardown sometimes aborts a rank at interpreter exit ("terminate called
    # without an active exception", SIGABRT) after destroy_process_group(); every run was
    # ended (and so stored) inside main(), so leave without running exit handlers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
