"""Clinical metrics against hand-computed values (6 images, 4 grades, referable = grade >= 2)."""
import numpy as np
import pytest

from trainer.clinical_metrics import (bootstrap_clinical, clinical_metrics, expected_calibration_error,
                                      referable_metrics, tensorboard_scalars)

Y = np.array([0, 1, 2, 3, 0, 2])
P = np.array([
    [0.7, 0.1, 0.1, 0.1],   # grade 0, called 0, referable score 0.2
    [0.2, 0.5, 0.2, 0.1],   # grade 1, called 1, score 0.3
    [0.1, 0.1, 0.6, 0.2],   # grade 2, called 2, score 0.8
    [0.1, 0.1, 0.3, 0.5],   # grade 3, called 3, score 0.8
    [0.1, 0.2, 0.1, 0.6],   # grade 0, called 3 (false referral), score 0.7
    [0.3, 0.4, 0.2, 0.1],   # grade 2, called 1 (missed referral), score 0.3
])


def test_referable_by_hand():
    r = referable_metrics(Y, P, 2)
    assert (r["positives"], r["negatives"]) == (3, 3)
    assert r["sensitivity"] == pytest.approx(2 / 3) and r["specificity"] == pytest.approx(2 / 3)
    # positive scores .8 .8 .3 vs negative .2 .3 .7: 2 x 3 wins + (1 win + 1 tie) = 7.5 of 9 pairs
    assert r["auc"] == pytest.approx(7.5 / 9)
    # at threshold 0.8 no negative is called referable (specificity 1) and 2 of 3 positives are
    assert r["sens_at_spec90"] == pytest.approx(2 / 3) and r["sens_at_spec95"] == pytest.approx(2 / 3)


def test_one_vs_rest_auc_and_ece_by_hand():
    m = clinical_metrics(Y, P, 4, 2)
    assert m["auc_ovr"] == pytest.approx([5 / 8, 1.0, 6.5 / 8, 4 / 5])
    assert m["auc_macro"] == pytest.approx((5 / 8 + 1.0 + 6.5 / 8 + 4 / 5) / 4)
    # confidences .7 (right), .5 .5 (right), .6 (right) .6 (wrong), .4 (wrong), each group in its own bin
    assert m["ece"] == pytest.approx((0.3 + 2 * 0.5 + 2 * 0.1 + 0.4) / 6)
    assert expected_calibration_error(Y, P) == m["ece"]


def test_sensitivity_at_specificity_needs_the_target_specificity():
    y = np.array([0] * 10 + [1] * 4)
    # one negative scores above every positive: only a threshold above it gives specificity 1 (sensitivity 0);
    # specificity 0.9 (1 false positive of 10) allows every positive
    score = np.array([0.1] * 9 + [0.95] + [0.9, 0.8, 0.7, 0.6])
    probs = np.stack([1 - score, score], 1)
    r = referable_metrics(y, probs, 1)
    assert r["sens_at_spec90"] == pytest.approx(1.0)
    assert r["sens_at_spec95"] == pytest.approx(0.0)


def test_no_referable_metrics_without_an_ordered_scale():
    assert clinical_metrics(Y, P, 4, None)["referable"] is None
    assert clinical_metrics(Y, P, 4, 4)["referable"] is None  # threshold past the last grade
    assert clinical_metrics(Y, P, 4, 0)["referable"] is None


def test_undefined_auc_is_none_not_nan():
    y = np.zeros(4, dtype=int)
    probs = np.full((4, 3), 1 / 3)
    m = clinical_metrics(y, probs, 3, 2)
    assert m["referable"]["auc"] is None and m["referable"]["sensitivity"] is None
    assert m["auc_ovr"] == [None, None, None] and m["auc_macro"] is None


def test_bootstrap_intervals_bracket_perfect_and_are_reproducible():
    y = np.array([0, 1, 2, 3, 4] * 6)
    perfect = np.eye(5)[y] * 0.9 + 0.02
    ci = bootstrap_clinical(y, perfect, 5, 2, n_boot=50, seed=3)
    assert ci["referable.sensitivity"] == [1.0, 1.0] and ci["referable.auc"] == [1.0, 1.0]
    a = bootstrap_clinical(Y, P, 4, 2, n_boot=60, seed=1)
    assert a == bootstrap_clinical(Y, P, 4, 2, n_boot=60, seed=1)
    lo, hi = a["referable.auc"]
    assert 0.0 <= lo <= 7.5 / 9 <= hi <= 1.0 and lo < hi


def test_tensorboard_tags():
    tags = tensorboard_scalars("test", clinical_metrics(Y, P, 4, 2), ["g0", "g1", "g2", "g3"])
    assert tags["test/referable/auc"] == pytest.approx(7.5 / 9)
    assert tags["test/auc/g1"] == 1.0 and "test/ece" in tags and "test/auc_macro" in tags


def test_auc_agrees_with_scikit_learn_including_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    probs = rng.dirichlet(np.ones(5), 300).round(2)  # rounding makes many ties
    m = clinical_metrics(y, probs, 5, 2)
    assert m["referable"]["auc"] == pytest.approx(roc_auc_score(y >= 2, probs[:, 2:].sum(1)), abs=1e-12)
    for k in range(5):
        assert m["auc_ovr"][k] == pytest.approx(roc_auc_score(y == k, probs[:, k]), abs=1e-12)
