"""Selection inside `metaloss study`: the study file's `selection` section, redundant cells, and (slow) a reduced
comparison study end to end -- ce and meta, two learning rates, two seeds, tiny model -- whose choices follow the
select split only (rewriting every test result leaves choices.json byte-identical) and whose meta runs get their CE
control."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from tests.support.cli import run_cli
from launch.study.spec import StudyError, load_study

FOUR = [0.6, 0.15, 0.1, 0.15]


def _study_file(tmp_path, data_dir, **overrides):
    study = {"name": "cmp", "base": "configs/demo.yaml", "out": str(tmp_path / "out"),
             "set": {"data.root": str(data_dir), "data.format": "aptos", "data.backend": "torch",
                     "data.image_size": 32, "data.num_workers": 0, "data.split_fractions": FOUR,
                     "model.arch": "tiny", "train.max_steps": 3, "train.batch_size": 8, "train.eval_batch_size": 32,
                     "logging.every_steps": 3, "checkpoint.enabled": False},
             "grid": {"train.loss": ["ce", "meta"], "optim.lr": [0.001, 0.01]}, "seeds": [0, 1],
             "selection": {"metric": "macro_f1", "tune": ["optim.lr"]}}
    study.update(overrides)
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_grid_keys_a_loss_ignores_do_not_multiply_its_runs(tmp_path):
    path = _study_file(tmp_path, tmp_path, grid={"train.loss": ["ce", "ldam", "meta"], "optim.lr": [0.001, 0.01],
                                                 "meta.lr": [0.001, 0.01], "loss.ldam_max_margin": [0.3, 0.5],
                                                 "data.baselines_use_meta_split": [False, True]},
                       selection={"tune": ["optim.lr", "meta.lr", "loss.ldam_max_margin"]})
    study = load_study(path)
    per_seed = [dict(r.cell) for r in study.runs if r.seed == 0]
    count = {loss: sum(c["train.loss"] == loss for c in per_seed) for loss in ("ce", "ldam", "meta")}
    # ce: 2 lr x 2 variants; ldam: x 2 margins; meta: 2 lr x 2 meta.lr, one variant
    assert count == {"ce": 4, "ldam": 8, "meta": 4}


@pytest.mark.parametrize("selection,fractions,message", [
    ({"tune": ["meta.lr"]}, FOUR, "not grid keys"),
    ({"tune": ["optim.lr"], "metric": "f2"}, FOUR, "selection.metric"),
    ({"tune": ["optim.lr"], "nope": 1}, FOUR, "unknown key"),
    ({"tune": ["optim.lr"]}, [0.7, 0.15, 0.15], "give 4 fractions"),
])
def test_bad_selection_sections_are_refused_naming_the_key(tmp_path, selection, fractions, message):
    path = _study_file(tmp_path, tmp_path, selection=selection)
    data = yaml.safe_load(path.read_text())
    data["set"]["data.split_fractions"] = fractions
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(StudyError, match=message):
        load_study(path)


def _rows(out):
    with open(out / "study" / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_reduced_comparison_study_chooses_on_select_only_and_runs_controls(synth_dir, tmp_path):
    path = _study_file(tmp_path, synth_dir)
    out = tmp_path / "out"
    # 10 runs of a few seconds each, two at a time (the controls too); the generous timeout is for a shared CPU
    run_cli("-m", "launch.cli", "study", str(path), "--jobs", "2", timeout=1800, env={"OMP_NUM_THREADS": "1"})
    check_choices_and_controls(out)
    check_test_results_cannot_move_a_choice(path, out)


def check_choices_and_controls(out):
    rows = _rows(out)
    grid = [r for r in rows if not r["control_of"]]
    controls = [r for r in rows if r["control_of"]]
    assert len(grid) == 8 and all(r["status"] == "done" for r in rows)
    choices = json.loads((out / "study" / "choices.json").read_text())
    assert len(choices) == 4  # (ce, meta) x 2 seeds
    for c in choices:
        candidates = [r for r in grid if r["train.loss"] == c["cell"]["train.loss"] and int(r["seed"]) == c["seed"]]
        scores = [float(r["select_macro_f1"]) for r in candidates]
        # the first of the best select scores in sweep order: the test columns play no part
        assert c["run"] == candidates[scores.index(max(scores))]["run"]
        on_disk = json.loads((out / "runs" / c["run"] / "metrics.json").read_text())
        assert c["select_macro_f1"] == on_disk["select"]["macro_f1"]
    # one CE control per chosen meta run, at that run's lr x its mean meta weight
    chosen_meta = {c["run"] for c in choices if c["cell"]["train.loss"] == "meta"}
    assert {r["control_of"] for r in controls} == chosen_meta
    for r in controls:
        meta_dir = out / "runs" / r["control_of"]
        w_bar = json.loads((meta_dir / "metrics.json").read_text())["meta_weight_mean"]
        meta_lr = yaml.safe_load((meta_dir / "config.yaml").read_text())["optim"]["lr"]
        cfg = yaml.safe_load((out / "runs" / r["run"] / "config.yaml").read_text())
        assert cfg["train"]["loss"] == "ce" and cfg["optim"]["lr"] == pytest.approx(meta_lr * w_bar, rel=1e-9)
    report = (out / "study" / "report.md").read_text()
    assert "select-split macro_f1 at the final epoch" in report
    assert "| CE control of meta (lr × mean meta weight" in report
    assert "### Paired difference to best fixed baseline ce" in report


def check_test_results_cannot_move_a_choice(path, out):
    """Different test labels change the test results and nothing else: rewrite every test block, re-collect."""
    controls = {r["run"] for r in _rows(out) if r["control_of"]}
    before = (out / "study" / "choices.json").read_bytes()
    for metrics_path in (out / "runs").glob("*/metrics.json"):
        m = json.loads(metrics_path.read_text())
        m["test"].update(macro_f1=1.0 - m["test"]["macro_f1"], accuracy=0.0, qwk=-1.0)
        metrics_path.write_text(json.dumps(m))
    run_cli("-m", "launch.cli", "study", str(path), "--collect")
    assert (out / "study" / "choices.json").read_bytes() == before
    assert {r["run"] for r in _rows(out) if r["control_of"]} == controls
