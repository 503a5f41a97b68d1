"""The study's per-run metric columns (launch/study/results.py): the rare grades' recall beside the headline metrics."""
from launch.study.results import metric_values
from launch.study.spec import METRICS


def test_grade_recalls_come_from_per_class_recall_and_absent_grades_stay_empty():
    test = {"accuracy": 0.7, "macro_f1": 0.5, "per_class_recall": [0.9, 0.5, 0.4, 0.25, 0.0],
            "support": [40, 10, 20, 4, 0], "referable": {"auc": 0.8}}
    values = metric_values(test)
    assert set(values) == set(METRICS)  # every column a study may name as its metric
    assert [values[f"recall_{k}"] for k in range(5)] == [0.9, 0.5, 0.4, 0.25, None]
    assert values["referable_auc"] == 0.8 and values["qwk"] is None


def test_fewer_classes_leave_the_higher_grades_empty():
    values = metric_values({"per_class_recall": [0.8, 0.6], "support": [5, 5]})
    assert [values[f"recall_{k}"] for k in range(5)] == [0.8, 0.6, None, None, None]
