"""Classification metrics for graded, imbalanced labels (numpy, computed once per evaluation on gathered labels).

Quadratic weighted kappa is APTOS 2019's official metric; macro-F1 and per-class recall are what the rare grades
(3 severe, 4 proliferative) show up in. Implemented from the confusion matrix so they agree with scikit-learn
(tests cross-check), including the zero-division convention (a class never predicted has precision 0).
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.zeros_like(a)
    np.divide(a, b, out=out, where=b != 0)
    return out


def quadratic_weighted_kappa(cm: np.ndarray) -> float:
    k = cm.shape[0]
    n = cm.sum()
    if n == 0:
        return 0.0
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    weights = (i - j) ** 2 / max((k - 1) ** 2, 1)
    expected = np.outer(cm.sum(1), cm.sum(0)) / n
    denom = (weights * expected).sum()
    if denom == 0:  # a single class everywhere: sklearn returns 0/0 -> nan; we report perfect agreement as 1
        return 1.0 if (weights * cm).sum() == 0 else 0.0
    return float(1.0 - (weights * cm).sum() / denom)


def metrics_from_confusion(cm: np.ndarray) -> dict:
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    recall = _safe_div(tp, support)
    precision = _safe_div(tp, predicted)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    n = cm.sum()
    present = support > 0
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        # macro over the labels present in y_true or y_pred, as sklearn does with its default `labels`
        "macro_f1": float(f1[present | (predicted > 0)].mean()) if n else 0.0,
        "weighted_f1": float((f1 * support).sum() / support.sum()) if n else 0.0,
        "qwk": quadratic_weighted_kappa(cm),
        "per_class_recall": recall.tolist(),
        "per_class_precision": precision.tolist(),
        "per_class_f1": f1.tolist(),
        "support": support.astype(int).tolist(),
        "confusion": cm.astype(int).tolist(),
        "n": int(n),
    }


def compute_metrics(y_true, y_pred, num_classes: int) -> dict:
    """accuracy, macro/weighted F1, QWK, per-class recall/precision/F1, support, confusion (rows = truth)."""
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, num_classes))
