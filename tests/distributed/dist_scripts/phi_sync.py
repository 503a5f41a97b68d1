"""Two ranks, no data: does φ stay bit-identical through broadcast, mean all-reduce and an fp16 skip on one rank?

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/distributed/dist_scripts/phi_sync.py OUT_DIR STEPS

Each rank draws its own φ (seed = rank: only ``broadcast_from(0)`` can make them equal), applies STEPS updates with
rank-dependent gradients (``rank_grads``), then runs one fp16 meta step whose loss scale overflows on rank 1 only.
OUT_DIR/rank{R}.pt gets φ at the start (after the broadcast), after the updates, after the fp16 step, and whether
this rank saw the overflow.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.support.meta_oracles import K


def rank_grads(rank: int, step: int, like):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(p.shape, generator=gen) for p in like]


def main() -> int:
    out_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # rank, world and rendezvous from torchrun's environment
    rank = dist.get_rank()
    try:
        from trainer.components.models import TinyCNN
        from trainer.meta import MetaReweighter

        torch.manual_seed(rank)  # different initial φ per rank: broadcast must fix that
        rw = MetaReweighter.from_dict({"granularity": "class", "lr": 1e-2}, K)
        rw.broadcast_from(0)
        start = [p.detach().clone() for p in rw.meta_net.parameters()]
        for step in range(steps):
            rw.update(rank_grads(rank, step, rw.meta_net.parameters()))
        after_updates = [p.detach().clone() for p in rw.meta_net.parameters()]

        # fp16: rank 1's scale overflows, rank 0's does not -> nobody steps
        torch.manual_seed(0)
        model = TinyCNN(K).train()
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, K, (8,))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (100 if rank == 1 else 8))
        grads = rw.meta_gradient(model, (x, y), (x, y), 0.1,
                                 autocast=lambda: torch.autocast("cpu", dtype=torch.float16), grad_scaler=scaler)
        skipped = rw.last_skipped
        rw.update(grads)
        after_skip = [p.detach().clone() for p in rw.meta_net.parameters()]
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"start": start, "after_updates": after_updates, "after_skip": after_skip, "skipped": skipped},
                   out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
