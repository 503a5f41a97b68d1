"""Which config keys a loss reads -- so a study grid does not train the same thing twice.

A grid ``train.loss × meta.lr × data.baselines_use_meta_split`` would otherwise run every fixed loss once per
``meta.lr`` (which it never reads) and meta once per variant (which it ignores). A cell that differs from an earlier
one only in keys its loss ignores is redundant: the study keeps the first value of each ignored key and drops the
rest, so a per-loss sweep (``meta.lr`` for meta only, ``loss.ldam_max_margin`` for ldam only) is just a grid key.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from trainer.comparison.selection import LOSS_KEY, VARIANT_KEY

# loss.* keys read by each loss (trainer/components/losses.py build_loss); others read none
LOSS_READS: dict[str, tuple[str, ...]] = {
    "focal": ("loss.focal_gamma",),
    "class_balanced": ("loss.cb_beta", "loss.cb_base", "loss.focal_gamma"),
    "ldam": ("loss.ldam_max_margin", "loss.ldam_scale", "loss.drw_epoch"),
    "logit_adjusted": ("loss.la_tau",),
}


def ignored_by(loss: str, key: str) -> bool:
    """True when a run with ``train.loss = loss`` trains the same whatever ``key`` is set to."""
    if key.startswith("meta."):
        return loss != "meta"
    if key == VARIANT_KEY:  # meta needs the meta split for φ and ignores the switch
        return loss == "meta"
    if key.startswith("loss."):
        return key not in LOSS_READS.get(loss, ())
    return False


def redundant_cell(cell: Mapping[str, Any], grid: Mapping[str, Sequence], loss: str | None = None) -> bool:
    """True when ``cell`` sets a key its loss ignores to anything but that key's first grid value (the copy kept).
    ``loss``: the run's train.loss when it is not a grid key (from the study's fixed settings or base config)."""
    loss = cell.get(LOSS_KEY, loss)
    if loss is None:
        return False
    return any(ignored_by(str(loss), k) and v != grid[k][0] for k, v in cell.items() if k in grid)
