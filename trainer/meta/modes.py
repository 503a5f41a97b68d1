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
