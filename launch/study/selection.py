"""A study's ``selection`` section: settings chosen on the select split, the CE controls of the chosen meta runs,
and the comparison section of the report (the choosing itself is trainer/comparison/selection.py, pure).

    selection:
      metric: macro_f1            # on the select split at the final epoch (data.split_fractions needs 4 entries)
      tune: [optim.lr, meta.lr]   # grid keys that are settings of a method, not methods (chosen per cell and seed)
      controls: true              # CE at lr × mean meta weight beside every chosen meta run (default true)

Parsing and checking the section live in spec.py (with the rest of the study file). Flow: every grid run; then, per meta cell and seed, the chosen run's control (``launch.train RUN/config.yaml
--control-of RUN``, run dir ``<run>_ce_control``); then results.csv (controls as rows with ``control_of``) and the
report's comparison section. Controls depend on the choices, so a SLURM array holds the grid runs only: after it,
the ordinary `metaloss study` command skips the finished runs and trains the controls.
"""
from __future__ import annotations

import json

from launch.study.spec import RunSpec, Study
from trainer.comparison.selection import LOSS_KEY, choose_settings, is_fixed_loss, select_column

CONTROL_SUFFIX = "_ce_control"
# the headline metrics, plus the recall of the two rare grades (severe, proliferative) the method claims to lift
_REPORT_METRICS = ("macro_f1", "accuracy", "qwk", "recall_3", "recall_4")


def cell_keys(study: Study) -> list[str]:
    keys = [k for k in study.grid if k not in study.selection.tune]
    return keys + (["world_size"] if len(study.world_sizes) > 1 else [])


def choices(study: Study, rows: list[dict]):
    grid_rows = [r for r in rows if not r.get("control_of")]
    return choose_settings(grid_rows, cell_keys(study), study.selection.tune, study.selection.metric)


def control_runs(study: Study, rows: list[dict]) -> list[RunSpec]:
    """One control per chosen meta run (cells whose train.loss is meta), in the study's order."""
    if study.selection is None or not study.selection.controls:
        return []
    by_name = {r.name: r for r in study.runs}
    out = []
    for (cell, _seed), ch in choices(study, rows).items():
        if is_fixed_loss(cell) or ch.run not in by_name:
            continue
        run = by_name[ch.run]
        out.append(RunSpec(cell=run.cell, world_size=run.world_size, seed=run.seed, name=run.name + CONTROL_SUFFIX,
                           control_of=run.name))
    return out


def control_row(study: Study, run: RunSpec, row: dict) -> dict:
    """A results row of a control: its meta run's grid values with train.loss = ce, plus where its lr came from."""
    from trainer.comparison.control import read_control_record

    row = {**row, LOSS_KEY: "ce", "control_of": run.control_of, "cell": run.control_of + CONTROL_SUFFIX}
    record = read_control_record(study.runs_dir / run.name)
    if record is not None:
        row.update(meta_weight_mean=record["meta_weight_mean"], lr=record["lr"])
    return row


def select_values(metrics: dict, metric_values) -> dict:
    """``select_<metric>`` columns from metrics.json's select block (empty when the run has none)."""
    select = metrics.get("select")
    if not isinstance(select, dict):
        return {}
    return {select_column(k): v for k, v in metric_values(select).items()}


def comparison_section(study: Study, rows: list[dict]) -> str:
    from trainer.comparison.report import comparison_markdown

    grid_rows = [r for r in rows if not r.get("control_of")]
    controls = [r for r in rows if r.get("control_of") and r.get("status") == "done"]
    test_metrics = list(dict.fromkeys((study.metric, *_REPORT_METRICS)))
    return comparison_markdown(grid_rows, cell_keys=cell_keys(study), tune_keys=study.selection.tune,
                               metric=study.selection.metric, test_metrics=test_metrics, controls=controls)


def choices_json(study: Study, rows: list[dict]) -> str:
    """study/choices.json: what was chosen, per cell and seed (select score only; no test number)."""
    out = [{"cell": dict(c.cell), "seed": c.seed, "setting": dict(c.setting), "run": c.run,
            f"select_{study.selection.metric}": c.score, "considered": c.considered, "planned": c.planned}
           for c in choices(study, rows).values()]
    return json.dumps(out, indent=2, default=str) + "\n"
