"""``study/results.csv``: one row per run -- every grid key, world size, seed, status, test metrics, img/s, time.

Read from the run dirs (``metrics.json``) and the study's status file, so it can be rebuilt at any time
(``metaloss study STUDY.yaml --collect``, e.g. after a SLURM array finished).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from common.atomic import atomic_write_text
from launch.study.runner import STATUS_FILE, is_finished
from launch.study.spec import GRADE_RECALLS, METRICS, RunSpec, Study

RESULTS_FILE = "results.csv"
RUN_COLUMNS = ("run", "cell", "world_size", "seed", "status")
TAIL_COLUMNS = ("img_per_s", "train_s", "wall_s", "steps", "error")


def metric_values(test: dict) -> dict[str, float | None]:
    """The study's metric columns from a metrics.json test block (None where a run has no such number)."""
    ref = test.get("referable") or {}
    recalls = test.get("per_class_recall") or []
    support = test.get("support") or [1] * len(recalls)  # a grade absent from the split has no recall (not 0)
    return {"accuracy": test.get("accuracy"), "macro_f1": test.get("macro_f1"),
            "weighted_f1": test.get("weighted_f1"), "qwk": test.get("qwk"), "referable_auc": ref.get("auc"),
            "referable_sensitivity": ref.get("sensitivity"), "referable_specificity": ref.get("specificity"),
            "sens_at_spec90": ref.get("sens_at_spec90"), "sens_at_spec95": ref.get("sens_at_spec95"),
            "auc_macro": test.get("auc_macro"), "ece": test.get("ece"),
            **{name: (recalls[k] if k < len(recalls) and support[k] > 0 else None)
               for k, name in enumerate(GRADE_RECALLS)}}


def run_row(study: Study, run: RunSpec, status: dict) -> dict:
    run_dir = study.runs_dir / run.name
    entry = status.get(run.name, {})
    row = {"run": run.name, "cell": run.cell_name, **{k: v for k, v in run.cell}, "world_size": run.world_size,
           "seed": run.seed, "status": entry.get("status", "pending"), "error": entry.get("error", ""),
           "wall_s": entry.get("wall_s")}
    if is_finished(run_dir):
        m = json.loads((run_dir / "metrics.json").read_text())
        row.update(metric_values(m["test"]))
        if study.selection is not None:
            from launch.study.selection import select_values

            row.update(select_values(m, metric_values), meta_weight_mean=m.get("meta_weight_mean"))
        row.update(status="done", error="", img_per_s=m.get("train_img_per_s"), train_s=m.get("wall_s"),
                   steps=m.get("steps"))
    return row


def collect(study: Study) -> list[dict]:
    try:
        status = json.loads((study.state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        status = {}
    rows = [run_row(study, run, status) for run in study.runs]
    if study.selection is not None:  # the controls of the chosen meta runs (their choice needs the rows above)
        from launch.study.selection import control_row, control_runs

        rows += [control_row(study, run, run_row(study, run, status)) for run in control_runs(study, rows)]
    return rows


def columns(study: Study) -> list[str]:
    extra = []
    if study.selection is not None:
        extra = [*(f"select_{m}" for m in METRICS), "meta_weight_mean", "control_of", "lr"]
    return [*RUN_COLUMNS[:2], *study.grid, *RUN_COLUMNS[2:], *METRICS, *extra, *TAIL_COLUMNS]


def write_results(study: Study, rows: list[dict]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns(study), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns(study)})
    path = study.state_dir / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())
    return path
