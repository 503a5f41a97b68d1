"""The meta step's named options: look-ahead modes (``meta.lookahead``) -> their meta-gradient function, and the
other ``meta.*`` choices. Torch-free on purpose: the config imports it.

A look-ahead mode is ``fn(model, train_batch, meta_batch, lr, weighting, *, detach_features, lookahead_optimizer,
optimizer, autocast, scale, **extra) -> (grads wrt φ, meta loss)``; ``extra`` holds the ``meta.*`` keys named in
``MODE_KEYS``. A new mode is its module plus one line here (and its keys, if any); the reweighter dispatches by name.
"""
from __future__ import annotations

LOOKAHEADS: dict[str, str] = {
    "exact": "trainer.meta.exact:exact_meta_gradient",
    "second_order": "trainer.meta.second_order:second_order_meta_gradient",
    "head": "trainer.meta.head:head_meta_gradient",
}
# meta.* config keys a mode reads besides the ones every mode gets
MODE_KEYS: dict[str, tuple[str, ...]] = {"exact": ("directional", "fd_eps")}

GRANULARITIES: tuple[str, ...] = ("batch", "class", "sample")
LOOKAHEAD_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
DIRECTIONAL: tuple[str, ...] = ("forward_ad", "fd")


def lagged_real_step_needs(cfg) -> list[str]:
    """What ``meta.real_step: lagged`` still needs in a full config (empty = fine). It reuses the virtual gradient as
    the real one: equal only with detached features, and handled without a GradScaler, a DeepSpeed engine, a separate
    fp32 look-ahead or a compiled model."""
    if cfg.meta.real_step != "lagged":
        return []
    m, t = cfg.meta, cfg.train
    problems = [(m.lookahead != "exact", "meta.lookahead=exact"), (not m.detach_features, "meta.detach_features=true"),
                (t.precision == "fp16", "train.precision fp32 or bf16"),
                (t.distributed == "deepspeed", "train.distributed=ddp"), (m.precision != "same", "meta.precision=same"),
                (cfg.model.compile, "model.compile=false")]
    return [need for bad, need in problems if bad]
