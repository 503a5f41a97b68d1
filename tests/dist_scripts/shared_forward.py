"""N trainer steps (the real ``StepRunner``) with the shared forward and with the two-forward path, float64.

    torchrun --nproc_per_node 2 tests/dist_scripts/shared_forward.py OUT_DIR STEPS

Also imported by tests/test_meta_shared_forward.py for the 1-process runs. Each rank draws its own train and meta
batches (seeded by rank and step), so under DDP the ranks' virtual gradients differ and only the real step's
gradient is averaged. OUT_DIR/rank{R}.pt: {case: {"shared": state, "two_forward": state}} with state = θ, BatchNorm
buffers, θ's Adam state, φ, φ's Adam state; and {case: {"lagged": state}} for the ``meta.real_step: lagged`` cases.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

K = 3
CASES = {  # name -> meta config overrides
    "exact_batch": {"granularity": "batch", "lookahead": "exact"},
    "exact_class_adam": {"granularity": "class", "lookahead": "exact", "lookahead_optimizer": "adam"},
    "exact_batch_detached": {"granularity": "batch", "lookahead": "exact", "detach_features": True},
    "exact_sample_fd": {"granularity": "sample", "lookahead": "exact", "directional": "fd"},
    "head_class": {"granularity": "class", "lookahead": "head"},
}
LAGGED = {  # meta.real_step=lagged: compared with a by-hand reference in the test
    "lagged_class": {"granularity": "class", "lookahead": "exact", "detach_features": True, "real_step": "lagged"},
    "lagged_batch": {"granularity": "batch", "lookahead": "exact", "detach_features": True, "real_step": "lagged"},
}


class _Feed:
    def __init__(self, batches):
        self.batches = iter(batches)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.batches)


def batches(rank: int, steps: int, n: int, salt: int):
    from data_pipeline.types import Batch

    out = []
    for s in range(steps):
        gen = torch.Generator().manual_seed(10_000 * salt + 100 * s + rank)
        out.append(Batch(torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64),
                         torch.randint(0, K, (n,), generator=gen), torch.arange(n)))
    return out


def run(meta: dict, share: bool, steps: int, rank: int, acc, every: int = 1) -> dict[str, torch.Tensor]:
    """``steps`` StepRunner steps from a fixed initial state; returns every piece of trainable state."""
    from trainer.components.losses import build_loss
    from trainer.components.models import TinyCNN
    from trainer.components.optim import build_optimizer, build_scheduler
    from trainer.config import config_from_dict
    from trainer.engine.steps import StepRunner
    from trainer.meta import MetaReweighter

    cfg = config_from_dict({"train": {"loss": "meta", "cpu": True},
                            "meta": {**meta, "share_forward": share, "every": every, "lr": 1e-2,
                                     "lookahead_lr": 0.5}, "optim": {"lr": 1e-2}})
    torch.manual_seed(0)
    model = TinyCNN(K).double().train()
    optimizer = build_optimizer(cfg.optim, model.parameters(), fused=True)
    scheduler = build_scheduler(cfg.optim, optimizer, steps)
    torch.manual_seed(1)
    rw = MetaReweighter(cfg.meta, num_classes=K, dtype=torch.float64)
    rw.broadcast_from(0)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    runner = StepRunner(model=model, optimizer=optimizer, scheduler=scheduler,
                        loss_fn=build_loss("meta", cfg.loss, [1] * K, 1), reweighter=rw,
                        meta_stream=_Feed(batches(rank, steps, 6, salt=2)), accelerator=acc, cfg=cfg)
    assert runner.share_forward == ((share and meta["lookahead"] in ("exact", "head")) or runner.lagged)
    # batch granularity + detached features: the real gradient is the rescaled ∇mean(ℓ), no backward of its own
    assert runner.rescale == (runner.share_forward and not runner.lagged and meta["lookahead"] == "exact"
                              and meta["granularity"] == "batch" and meta.get("detach_features", False))
    # exact + forward_ad with the shared forward: tangents through the saved activations (vs a dual forward)
    assert runner.record == (runner.share_forward and not runner.rescale and meta["lookahead"] == "exact"
                             and meta.get("directional", "forward_ad") == "forward_ad"
                             and not (meta["granularity"] == "batch" and meta.get("detach_features", False)))
    for s, batch in enumerate(batches(rank, steps, 8, salt=1)):
        runner(batch, s)
    net = acc.unwrap_model(model)
    state = {f"theta.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    for i, st in enumerate(runner.raw_optimizer.state.values()):
        state.update({f"adam.{i}.{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)})
    state.update({f"phi.{k}": v.detach().clone() for k, v in rw.meta_net.state_dict().items()})
    for i, st in enumerate(rw.optimizer.state.values()):
        state.update({f"phi_adam.{i}.{k}": v.clone() for k, v in st.items() if torch.is_tensor(v)})
    return state


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
