"""Every imbalance loss against values computed by hand with numpy (not with trainer.components.losses' own helpers)."""
import math

import numpy as np
import pytest
import torch

from trainer.config import LossConfig
from trainer.components.losses import LossError, build_loss

COUNTS = [100, 10, 1]
LOGITS = np.array([[2.0, 0.5, -1.0],
                   [0.1, 0.3, 0.2],
                   [-0.5, 1.5, 0.0],
                   [1.0, -2.0, 3.0]])
LABELS = np.array([0, 1, 2, 2])


def _run(name, cfg=None, counts=COUNTS, epochs=12, logits=LOGITS, labels=LABELS):
    loss = build_loss(name, cfg or LossConfig(), counts, epochs)
    out = loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(labels))
    assert out.shape == (len(labels),)
    return loss, out.numpy()


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ce(z, y):
    return -_log_softmax(z)[np.arange(len(y)), y]


def test_ce_and_meta_are_plain_cross_entropy():
    # row 0 by hand: -log(e^2 / (e^2 + e^0.5 + e^-1))
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0.5) + math.exp(-1)))
    for name in ("ce", "meta"):
        _, out = _run(name)
        np.testing.assert_allclose(out, _ce(LOGITS, LABELS), rtol=1e-12)
        assert out[0] == pytest.approx(row0, rel=1e-12)


def test_weighted_ce_inverse_frequency_mean_one():
    inv = np.array([1 / 100, 1 / 10, 1 / 1])
    w = inv / inv.mean()                      # mean 1 over classes
    assert w.mean() == pytest.approx(1.0)
    _, out = _run("weighted_ce")
    np.testing.assert_allclose(out, w[LABELS] * _ce(LOGITS, LABELS), rtol=1e-12)


def test_focal_matches_formula_and_gamma_zero_is_ce():
    cfg = LossConfig(focal_gamma=2.0)
    p = np.exp(_log_softmax(LOGITS))[np.arange(4), LABELS]
    _, out = _run("focal", cfg)
    np.testing.assert_allclose(out, -(1 - p) ** 2 * np.log(p), rtol=1e-12)
    _, out0 = _run("focal", LossConfig(focal_gamma=0.0))
    np.testing.assert_allclose(out0, _ce(LOGITS, LABELS), rtol=1e-12)


@pytest.mark.parametrize("base", ["ce", "focal"])
def test_class_balanced_effective_number(base):
    beta = 0.99
    cfg = LossConfig(cb_beta=beta, cb_base=base, focal_gamma=1.5)
    eff = np.array([(1 - beta ** n) / (1 - beta) for n in COUNTS])   # effective numbers
    w = (1 / eff) / (1 / eff).sum() * 3                               # sum K
    assert w.sum() == pytest.approx(3.0)
    p = np.exp(_log_softmax(LOGITS))[np.arange(4), LABELS]
    base_loss = _ce(LOGITS, LABELS) if base == "ce" else -(1 - p) ** 1.5 * np.log(p)
    _, out = _run("class_balanced", cfg)
    np.testing.assert_allclose(out, w[LABELS] * base_loss, rtol=1e-12)


def test_ldam_margins_scale_and_drw_schedule():
    cfg = LossConfig(ldam_max_margin=0.5, ldam_scale=30.0, drw_epoch=-1)
    raw = np.array([n ** -0.25 for n in COUNTS])
    m = raw * (0.5 / raw.max())                         # largest margin = 0.5 (the 1-sample class)
    z = LOGITS.copy()
    z[np.arange(4), LABELS] -= m[LABELS]
    plain = _ce(30.0 * z, LABELS)
    loss, out = _run("ldam", cfg, epochs=12)            # DRW from int(2/3*12) = 8
    np.testing.assert_allclose(out, plain, rtol=1e-12)
    loss.set_epoch(7)
    out7 = loss(torch.tensor(LOGITS), torch.tensor(LABELS)).numpy()
    np.testing.assert_allclose(out7, plain, rtol=1e-12)
    loss.set_epoch(8)
    out8 = loss(torch.tensor(LOGITS), torch.tensor(LABELS)).numpy()
    eff = np.array([(1 - 0.9999 ** n) / (1 - 0.9999) for n in COUNTS])
    w = (1 / eff) / (1 / eff).sum() * 3
    np.testing.assert_allclose(out8, w[LABELS] * plain, rtol=1e-12)


def test_ldam_explicit_drw_epoch():
    loss = build_loss("ldam", LossConfig(drw_epoch=2), COUNTS, epochs=100)
    z, y = torch.tensor(LOGITS), torch.tensor(LABELS)
    before = loss(z, y)
    loss.set_epoch(2)
    after = loss(z, y)
    assert not torch.allclose(before, after)       # weights switched on at epoch 2, not at 66


@pytest.mark.parametrize("name,tau", [("logit_adjusted", 0.7), ("balanced_softmax", 1.0)])
def test_prior_adjusted_losses(name, tau):
    prior = np.array(COUNTS, dtype=float) / sum(COUNTS)
    _, out = _run(name, LossConfig(la_tau=0.7))
    np.testing.assert_allclose(out, _ce(LOGITS + tau * np.log(prior), LABELS), rtol=1e-12)


@pytest.mark.parametrize("name", ["ce", "weighted_ce", "focal", "class_balanced", "ldam", "logit_adjusted",
                                  "balanced_softmax"])
def test_zero_count_class_stays_finite(name):
    counts = [50, 0, 5]
    loss, out = _run(name, counts=counts)
    assert np.isfinite(out).all()
    loss.set_epoch(100)  # DRW weights on for ldam
    out = loss(torch.tensor(LOGITS), torch.tensor(LABELS)).numpy()
    assert np.isfinite(out).all()


def test_zero_count_weights_keep_normalisation():
    counts = [50, 0, 5]
    _, out = _run("weighted_ce", counts=counts)
    inv = np.array([1 / 50, 1 / 5])
    w_present = inv / inv.mean()
    w = np.array([w_present[0], 1.0, w_present[1]])  # absent class: neutral 1; mean over K stays 1
    np.testing.assert_allclose(out, w[LABELS] * _ce(LOGITS, LABELS), rtol=1e-12)


def test_bf16_logits_are_upcast():
    loss = build_loss("ce", LossConfig(), COUNTS, 12)
    out = loss(torch.tensor(LOGITS).bfloat16(), torch.tensor(LABELS))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("counts,match", [([1, -2, 3], r"class_counts\[1\]"), ([0, 0, 0], "count 0"),
                                          ([5], "per class"), ([1, 2.5, 3], r"class_counts\[1\]")])
def test_bad_counts_are_clear_errors(counts, match):
    with pytest.raises(LossError, match=match):
        build_loss("weighted_ce", LossConfig(), counts, 12)


def test_unknown_loss_and_wrong_logit_width():
    with pytest.raises(LossError, match="train.loss"):
        build_loss("hinge", LossConfig(), COUNTS, 12)
    loss = build_loss("ce", LossConfig(), COUNTS, 12)
    with pytest.raises(LossError, match=r"\(N, 3\)"):
        loss(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
