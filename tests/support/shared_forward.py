"""The shared-forward equivalence problem (tests/unit/test_meta_shared_forward.py, and on two ranks
tests/distributed/dist_scripts/shared_forward.py): N float64 steps of the real ``StepRunner`` on a TinyCNN with
BatchNorm, with ``meta.share_forward`` on or off, and a by-hand reference for ``meta.real_step: lagged``.

Each rank draws its own train and meta batches (seeded by rank and step), so under DDP the ranks' virtual gradients
differ and only the real step's gradient is averaged.
"""
from __future__ import annotations

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


def lagged_reference(meta: dict, steps: int, ranks) -> dict[str, torch.Tensor]:
    """θ and φ after ``steps`` lagged steps, by hand; every rank's data in this one process."""
    import torch.nn.functional as F

    from trainer.components.models import TinyCNN
    from trainer.config import config_from_dict
    from trainer.meta import MetaReweighter

    cfg = config_from_dict({"meta": {**meta, "lr": 1e-2, "lookahead_lr": 0.5}})
    torch.manual_seed(0)
    model = TinyCNN(K).double().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    rw = MetaReweighter(cfg.meta, num_classes=K, dtype=torch.float64)
    train = {r: batches(r, steps, 8, salt=1) for r in ranks}
    meta_batches = {r: batches(r, steps, 6, salt=2) for r in ranks}
    params = list(model.parameters())
    for s in range(steps):
        real, phi = [], []
        for r in ranks:
            b, mb = train[r][s], meta_batches[r][s]
            losses = F.cross_entropy(model(b.images), b.labels, reduction="none")
            w = rw.weights(losses, b.labels)  # φ before this step's update
            real.append(torch.autograd.grad((w * losses).mean(), params))
            phi.append(rw.meta_gradient(model, (b.images, b.labels), (mb.images, mb.labels), 0.5))
        for p, *gs in zip(params, *real):
            p.grad = sum(gs) / len(ranks)
        opt.step()
        rw.update([sum(gs) / len(ranks) for gs in zip(*phi)])
    out = {f"theta.{k}": v.detach() for k, v in model.named_parameters()}
    out.update({f"phi.{k}": v.detach() for k, v in rw.meta_net.state_dict().items()})
    return out


def assert_close(a: dict, b: dict, tol: float) -> None:
    """Same keys; floating tensors within tol (absolute, scaled by max(1, |b|max)); the rest bit-equal."""
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = max(1.0, float(b[k].abs().max()))
            assert float((a[k] - b[k]).abs().max()) <= tol * scale, k
        else:
            assert torch.equal(a[k], b[k]), k
