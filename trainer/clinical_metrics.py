"""The numbers DR grading papers report besides accuracy: referable DR, one-vs-rest AUC, calibration.

Referable DR is grade >= ``referable_from`` (2 = moderate or worse). Its score is the probability mass on the
referable grades, P(grade >= r) = sum of softmax probabilities of those grades, and a case is called referable when
the predicted grade (argmax) is referable, so the referable sensitivity/specificity agree with the confusion matrix.
Sensitivity at a fixed specificity is read off the full ROC curve (scikit-learn): the highest true-positive rate
among thresholds whose specificity is at least the target. ECE uses the top-label confidence in 15 equal-width bins.

Every function takes gathered numpy arrays (labels N, probs N x K) and returns plain floats, or None where the
number is undefined (e.g. an AUC on a test set with one class only) -- never a NaN that would poison a mean.
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15
SPECIFICITY_TARGETS = (0.90, 0.95)
# the headline numbers that get bootstrap intervals (dotted keys into clinical_metrics' result)
HEADLINE = ("referable.sensitivity", "referable.specificity", "referable.auc", "referable.sens_at_spec90",
            "referable.sens_at_spec95", "ece", "auc_macro")


def referable_enabled(referable_from: int | None, num_classes: int) -> bool:
    """Referable metrics need an ordered grade scale with grades on both sides of the threshold."""
    return referable_from is not None and 1 <= referable_from < num_classes


def _auc(y_bin: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney statistic (average ranks for ties): the value sklearn's roc_auc_score gives
    (cross-checked in the tests) without its per-call input validation, which dominates a 1000-resample bootstrap."""
    from scipy.stats import rankdata

    pos = int(y_bin.sum())
    neg = len(y_bin) - pos
    if pos == 0 or neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[y_bin].sum() - pos * (pos + 1) / 2) / (pos * neg))


def sensitivity_at_specificities(y_bin: np.ndarray, score: np.ndarray,
                                 specificities=SPECIFICITY_TARGETS) -> list[float | None]:
    """The highest sensitivity among ROC thresholds with specificity >= each target (one ROC curve for all)."""
    from sklearn.metrics import roc_curve

    if y_bin.all() or not y_bin.any():
        return [None] * len(specificities)
    fpr, tpr, _ = roc_curve(y_bin, score, drop_intermediate=False)
    return [float(tpr[fpr <= (1.0 - t) + 1e-12].max()) for t in specificities]


def referable_metrics(y_true, probs, referable_from: int) -> dict:
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    y_bin = np.asarray(y_true >= referable_from, dtype=bool)
    score = probs[:, referable_from:].sum(1)
    called = probs.argmax(1) >= referable_from
    pos, neg = int(y_bin.sum()), int((~y_bin).sum())
    out = {
        "from_grade": int(referable_from),
        "positives": pos,
        "negatives": neg,
        "sensitivity": float((called & y_bin).sum() / pos) if pos else None,
        "specificity": float((~called & ~y_bin).sum() / neg) if neg else None,
        "auc": _auc(y_bin, score),
    }
    for t, sens in zip(SPECIFICITY_TARGETS, sensitivity_at_specificities(y_bin, score)):
        out[f"sens_at_spec{round(t * 100)}"] = sens
    return out


def auc_one_vs_rest(y_true, probs, num_classes: int) -> list[float | None]:
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    return [_auc(np.asarray(y_true == k, dtype=bool), probs[:, k]) for k in range(num_classes)]


def expected_calibration_error(y_true, probs, bins: int = ECE_BINS) -> float | None:
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        return None
    conf = probs.max(1)
    correct = probs.argmax(1) == y_true
    # bin b holds confidences in (b/B, (b+1)/B]; a confidence of exactly 0 cannot occur for a softmax top label
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    # per bin: |sum(correct) - sum(conf)| = n_b * |accuracy_b - confidence_b|
    gap = np.bincount(which, weights=correct.astype(np.float64), minlength=bins) - \
        np.bincount(which, weights=conf, minlength=bins)
    return float(np.abs(gap).sum() / len(y_true))


def clinical_metrics(y_true, probs, num_classes: int, referable_from: int | None) -> dict:
    """{"referable": {...} | None, "auc_ovr": [K], "auc_macro": mean of the defined ones | None, "ece": float}."""
    aucs = auc_one_vs_rest(y_true, probs, num_classes)
    defined = [a for a in aucs if a is not None]
    return {
        "referable": referable_metrics(y_true, probs, referable_from)
        if referable_enabled(referable_from, num_classes) else None,
        "auc_ovr": aucs,
        "auc_macro": float(np.mean(defined)) if defined else None,
        "ece": expected_calibration_error(y_true, probs),
    }


def headline_value(metrics: dict, dotted: str):
    node = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def bootstrap_clinical(y_true, probs, num_classes: int, referable_from: int | None, *, n_boot: int = 200,
                       seed: int = 0, alpha: float = 0.05) -> dict[str, list[float] | None]:
    """Percentile intervals [lo, hi] of the HEADLINE numbers over ``n_boot`` resamples of the test images (one set
    of resamples for all of them). A number undefined in more than half of the resamples gets None."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in HEADLINE}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y_true), len(y_true))
        m = clinical_metrics(y_true[idx], probs[idx], num_classes, referable_from)
        for key in HEADLINE:
            v = headline_value(m, key)
            if v is not None:
                draws[key].append(v)
    out: dict[str, list[float] | None] = {}
    for key, vals in draws.items():
        if len(vals) * 2 < n_boot or not vals:
            out[key] = None
        else:
            lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[key] = [float(lo), float(hi)]
    return out


def tensorboard_scalars(split: str, metrics: dict, class_names: list[str]) -> dict[str, float]:
    """The clinical numbers of one evaluation as TensorBoard tags (undefined ones left out)."""
    out: dict[str, float] = {}
    ref = metrics.get("referable")
    if ref:
        for key in ("sensitivity", "specificity", "auc", "sens_at_spec90", "sens_at_spec95"):
            if ref.get(key) is not None:
                out[f"{split}/referable/{key}"] = ref[key]
    for name, auc in zip(class_names, metrics.get("auc_ovr") or []):
        if auc is not None:
            out[f"{split}/auc/{name}"] = auc
    for key in ("auc_macro", "ece"):
        if metrics.get(key) is not None:
            out[f"{split}/{key}"] = metrics[key]
    return out
