"""The report's clinical table: referable DR, one-vs-rest AUC and calibration per run, with bootstrap intervals.

Computed from each run's predictions_test.csv (labels + probabilities), so it also works for run dirs written
before metrics.json carried these numbers. The referable threshold is the one the run was evaluated with
(``test.referable.from_grade`` in metrics.json); older runs default to grade 2 when they have 5 classes.
"""
from __future__ import annotations

from trainer.clinical_metrics import bootstrap_clinical, clinical_metrics, headline_value

_ROWS = (("Referable sensitivity", "referable.sensitivity"), ("Referable specificity", "referable.specificity"),
         ("Referable AUC", "referable.auc"), ("Sensitivity @ 90% specificity", "referable.sens_at_spec90"),
         ("Sensitivity @ 95% specificity", "referable.sens_at_spec95"), ("Macro one-vs-rest AUC", "auc_macro"),
         ("Expected calibration error", "ece"))


def referable_from_of(run) -> int | None:
    ref = run.test.get("referable")
    if isinstance(ref, dict) and isinstance(ref.get("from_grade"), int):
        return ref["from_grade"]
    if "referable" in run.test:  # evaluated, and deliberately none (not an ordered grade scale)
        return None
    return 2 if len(run.class_names) == 5 else None


def clinical_table_markdown(runs, *, n_boot: int, seed: int, table) -> str:
    """``table(header, rows, right_from)`` is the report's Markdown table writer."""
    cols, per_class = [], []
    for r in runs:
        k, thr = len(r.class_names), referable_from_of(r)
        point = clinical_metrics(r.y_true, r.probs, k, thr)
        cis = bootstrap_clinical(r.y_true, r.probs, k, thr, n_boot=n_boot, seed=seed)
        cols.append((point, cis))
        per_class.append(point["auc_ovr"])

    def cell(point, cis, key):
        v = headline_value(point, key)
        if v is None:
            return "n/a"
        ci = cis.get(key)
        return f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{v:.4f}"

    rows = [[title, *(cell(p, c, key) for p, c in cols)] for title, key in _ROWS]
    rows += [[f"AUC {name} vs rest", *("n/a" if a[i] is None else f"{a[i]:.4f}" for a in per_class)]
             for i, name in enumerate(runs[0].class_names)]
    return table(["Metric", *(r.label for r in runs)], rows, right_from=1)
