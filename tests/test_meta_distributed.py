"""φ stays bit-identical across 2 real CPU processes (gloo): broadcast at start, mean all-reduce in update,
and an fp16 skip on one rank skips the meta step on every rank."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from meta_oracles import K

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_grads(rank: int, step: int, like):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(p.shape, generator=gen) for p in like]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from trainer.meta import MetaReweighter
        from trainer.components.models import TinyCNN

        torch.manual_seed(rank)  # different initial φ per rank: broadcast must fix that
        rw = MetaReweighter.from_dict({"granularity": "class", "lr": 1e-2}, K)
        rw.broadcast_from(0)
        start = [p.detach().clone() for p in rw.meta_net.parameters()]
        for step in range(STEPS):
            rw.update(_rank_grads(rank, step, rw.meta_net.parameters()))
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
        torch.save({"start": start, "after_updates": after_updates, "after_skip": after_skip, "skipped": skipped},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_phi_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("start", "after_updates", "after_skip"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key
    assert (r0["skipped"], r1["skipped"]) == (False, True)
    for a, b in zip(r0["after_updates"], r0["after_skip"]):
        assert torch.equal(a, b)  # the skip on rank 1 stopped rank 0's step too

    # the updates were Adam steps on the mean of the two ranks' gradients, from rank 0's initial φ
    from trainer.meta import MetaReweighter
    ref = MetaReweighter.from_dict({"granularity": "class", "lr": 1e-2}, K)
    with torch.no_grad():
        for p, s in zip(ref.meta_net.parameters(), r0["start"]):
            p.copy_(s)
    for step in range(STEPS):
        g0 = _rank_grads(0, step, ref.meta_net.parameters())
        g1 = _rank_grads(1, step, ref.meta_net.parameters())
        ref.update([(a + b) / 2 for a, b in zip(g0, g1)])
    for a, b in zip(ref.meta_net.parameters(), r0["after_updates"]):
        assert torch.equal(a.detach(), b)
