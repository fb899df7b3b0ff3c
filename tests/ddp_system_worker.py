"""Worker for test_system's DDP test: 2 ranks (gloo on CPU) posing as two nodes.

Each rank claims to be the first process of its own node (LOCAL_RANK=0, GROUP_RANK=rank),
so both sample: rank 0 into its run, rank 1 into rank 0's run through its NoopRun. The
run stays open until both have taken two samples; prints one JSON line per rank.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch.distributed as dist

from trainkit_tracking import RunSpec
from trainkit_tracking.integrations.torch import init_tracker_for_ddp, rank

SAMPLES = 2
DEADLINE = 60.0


def main() -> None:
    me = int(os.environ["RANK"])
    environ = {**os.environ, "GROUP_RANK": str(me), "LOCAL_RANK": "0"}
    tracker = init_tracker_for_ddp(
        "ddp-system",
        backend="gloo",
        environ=environ,
        system_metrics=True,
        system_metrics_interval=0.2,
    )
    sampler = tracker._system
    assert sampler is not None
    spec = RunSpec(kind="final_training", model="tiny", environment="local")
    with tracker.start_run(spec) as run:
        deadline = time.monotonic() + DEADLINE
        while sampler.samples < SAMPLES and time.monotonic() < deadline:
            time.sleep(0.05)
        dist.barrier()  # neither rank ends the run before the other has sampled
    print(
        json.dumps(
            {
                "rank": rank(),
                "run_id": run.id,
                "type": type(run).__name__,
                "samples": sampler.samples,
            }
        ),
        flush=True,
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # As in ddp_worker.py: gloo's teardown may abort at exit; everything was stored in main().
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
