import numpy as np
import pytest
from sklearn import metrics as skm

from trainer.metrics import compute_metrics


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    k = 5
    y = rng.choice(k, size=300, p=[0.5, 0.1, 0.25, 0.05, 0.1])
    # predictions correlated with the truth, with some classes possibly never predicted
    p = np.where(rng.random(300) < 0.6, y, rng.choice(k - (seed % 2), size=300))
    m = compute_metrics(y, p, k)
    labels = list(range(k))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, p, average="weighted", zero_division=0))
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(y, p, weights="quadratic"))
    np.testing.assert_allclose(m["per_class_recall"], skm.recall_score(y, p, labels=labels, average=None,
                                                                       zero_division=0))
    np.testing.assert_allclose(m["per_class_precision"], skm.precision_score(y, p, labels=labels, average=None,
                                                                             zero_division=0))
    np.testing.assert_array_equal(m["confusion"], skm.confusion_matrix(y, p, labels=labels))
    assert m["support"] == np.bincount(y, minlength=k).tolist()


def test_perfect_and_constant_predictions():
    y = np.array([0, 1, 2, 3, 4, 0])
    m = compute_metrics(y, y, 5)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["qwk"] == pytest.approx(1.0)
    m0 = compute_metrics(y, np.zeros_like(y), 5)
    assert m0["per_class_recall"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert m0["qwk"] == pytest.approx(skm.cohen_kappa_score(y, np.zeros_like(y), weights="quadratic"))
