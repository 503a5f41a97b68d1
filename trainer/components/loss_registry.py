"""The losses by name (``train.loss``): name -> its builder in ``losses.py``.

A builder is ``build(counts: float64 tensor (K,), loss_cfg: LossConfig, epochs: int) -> PerSampleLoss`` (per-sample
losses, the trainer reduces). A new loss is its class and builder plus one line here; the config's choices and its
validation follow from this table. Torch-free on purpose: the config imports it.
"""
from __future__ import annotations

LOSSES: dict[str, str] = {
    "ce": "trainer.components.losses:build_cross_entropy",
    "weighted_ce": "trainer.components.losses:build_weighted_ce",
    "focal": "trainer.components.losses:build_focal",
    "class_balanced": "trainer.components.losses:build_class_balanced",
    "ldam": "trainer.components.losses:build_ldam",
    "logit_adjusted": "trainer.components.losses:build_logit_adjusted",
    "balanced_softmax": "trainer.components.losses:build_balanced_softmax",
    "meta": "trainer.components.losses:build_cross_entropy",  # the MetaReweighter weights plain CE per sample
}
