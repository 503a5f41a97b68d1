"""N trainer steps with the shared forward and with the two-forward path on two ranks (float64, gloo).

    torchrun --nproc_per_node 2 tests/distributed/dist_scripts/shared_forward.py OUT_DIR STEPS

The problem is tests/support/shared_forward.py. OUT_DIR/rank{R}.pt: {case: {"shared": state, "two_forward": state}}
with state = θ, BatchNorm buffers, θ's Adam state, φ, φ's Adam state; and {case: {"lagged": state}} for the
``meta.real_step: lagged`` cases.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.support.shared_forward import CASES, LAGGED, run  # the launchers put the repo on PYTHONPATH


def main() -> int:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    out_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo",
                                                                        timeout=timedelta(minutes=2))])
    rank = acc.process_index
    result = {name: {"shared": run(meta, True, steps, rank, acc), "two_forward": run(meta, False, steps, rank, acc)}
              for name, meta in CASES.items()}
    result.update({name: {"lagged": run(meta, True, steps, rank, acc)} for name, meta in LAGGED.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"world": acc.num_processes, "cases": result}, out_dir / f"rank{rank}.pt")
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
