"""Two ranks, float64: what ∇φ does ``MetaReweighter.update`` apply, and does φ stay identical?

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/distributed/dist_scripts/meta_grad_mean.py OUT_DIR DATA_DIR STEPS

Each rank takes its own shard of the train and meta streams (the real ``build_streams`` sharding), starts φ from a
*rank-dependent* seed (so only ``broadcast_from(0)`` can make them equal), and for STEPS steps computes its local
meta-gradient through the DDP-wrapped classifier and calls ``update``. A pre-hook on φ's Adam records the gradient
the optimiser actually applies. OUT_DIR/rank{R}.pt gets, per step: φ before, the local gradient, the applied
gradient; plus φ and the Adam state at the end. The test recomputes the single-process gradients on each shard.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch

from tests.support.dist import LOOKAHEAD_LR, meta_problem  # the launchers put the repo on PYTHONPATH


def main() -> int:
    out_dir, data_dir, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from trainer.meta import MetaReweighter

    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo",
                                                                        timeout=timedelta(minutes=2))])
    rank, world = acc.process_index, acc.num_processes
    cfg, model, streams = meta_problem(data_dir, rank, world)
    ddp_model = acc.prepare(model)  # the trainer hands meta_gradient the wrapped model; it must unwrap it

    torch.manual_seed(1000 + rank)  # different φ per rank on purpose
    rw = MetaReweighter(cfg.meta, num_classes=cfg.model.num_classes, dtype=torch.float64)
    phi_before_broadcast = [p.detach().clone() for p in rw.meta_net.parameters()]
    rw.broadcast_from(0)
    applied: list[list[torch.Tensor]] = []
    rw.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: applied.append([p.grad.detach().clone() for p in rw.meta_net.parameters()]))

    record = []
    train_iter = iter(streams.train)
    for _ in range(steps):
        batch, meta_batch = next(train_iter), next(streams.meta)
        phi = [p.detach().clone() for p in rw.meta_net.parameters()]
        local = rw.meta_gradient(ddp_model, (batch.images.double(), batch.labels),
                                 (meta_batch.images.double(), meta_batch.labels), LOOKAHEAD_LR)
        rw.update(local)
        record.append({"phi": phi, "local": [g.detach().clone() for g in local],
                       "train_ids": batch.ids.clone(), "meta_ids": meta_batch.ids.clone()})
    for r, a in zip(record, applied):
        r["applied"] = a
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"rank": rank, "world": world, "phi_before_broadcast": phi_before_broadcast, "steps": record,
                "phi_end": rw.meta_net.state_dict(), "adam_end": rw.optimizer.state_dict(),
                "n_applied": len(applied)}, out_dir / f"rank{rank}.pt")
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
