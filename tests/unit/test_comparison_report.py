"""The comparison section: chosen settings per seed, test numbers of the chosen runs only, paired differences to the
best fixed baseline (not only to CE), and a row for the CE control of each meta method -- checked against numbers
worked out by hand from a small table."""
from __future__ import annotations

import pytest

from trainer.comparison.report import comparison_markdown, mean_interval

CELL = ["train.loss"]
TUNE = ["optim.lr", "meta.lr"]


def _row(loss, lr, seed, select, test, meta_lr=1e-3):
    return {"run": f"{loss}_{lr}_{meta_lr}_{seed}", "train.loss": loss, "optim.lr": lr, "meta.lr": meta_lr,
            "seed": seed, "status": "done", "select_macro_f1": select, "macro_f1": test}


ROWS = [
    # ce: seed 0 picks lr 1e-3 (test 0.50), seed 1 picks 3e-3 (test 0.60); the unchosen runs' test is high
    _row("ce", 1e-3, 0, 0.7, 0.50), _row("ce", 3e-3, 0, 0.6, 0.99),
    _row("ce", 1e-3, 1, 0.5, 0.99), _row("ce", 3e-3, 1, 0.6, 0.60),
    # focal: better select scores on both seeds -> the best fixed baseline; picks 1e-3 (0.70) and 1e-3 (0.64)
    _row("focal", 1e-3, 0, 0.8, 0.70), _row("focal", 3e-3, 0, 0.1, 0.00),
    _row("focal", 1e-3, 1, 0.8, 0.64), _row("focal", 3e-3, 1, 0.1, 0.00),
    # meta sweeps meta.lr too: seed 0 picks (1e-3, 1e-2) test 0.75, seed 1 picks (3e-3, 1e-3) test 0.62
    _row("meta", 1e-3, 0, 0.5, 0.10), _row("meta", 1e-3, 0, 0.9, 0.75, meta_lr=1e-2),
    _row("meta", 3e-3, 0, 0.4, 0.10), _row("meta", 3e-3, 0, 0.3, 0.10, meta_lr=1e-2),
    _row("meta", 1e-3, 1, 0.1, 0.10), _row("meta", 1e-3, 1, 0.2, 0.10, meta_lr=1e-2),
    _row("meta", 3e-3, 1, 0.9, 0.62), _row("meta", 3e-3, 1, 0.3, 0.10, meta_lr=1e-2),
]
CONTROLS = [
    {"run": "c0", "control_of": "meta_0.001_0.01_0", "seed": 0, "lr": 5e-4, "meta_weight_mean": 0.5, "macro_f1": 0.55},
    {"run": "c1", "control_of": "meta_0.003_0.001_1", "seed": 1, "lr": 1.2e-3, "meta_weight_mean": 0.4,
     "macro_f1": 0.65},
    {"run": "stale", "control_of": "meta_0.001_0.001_1", "seed": 1, "lr": 1e-4, "meta_weight_mean": 0.1,
     "macro_f1": 0.0},  # control of a run that was not chosen: ignored
]


@pytest.fixture(scope="module")
def text():
    return comparison_markdown(ROWS, cell_keys=CELL, tune_keys=TUNE, metric="macro_f1", test_metrics=["macro_f1"],
                               controls=CONTROLS)


def _line(text, start):
    (line,) = [ln for ln in text.splitlines() if ln.startswith(start)]
    return line


def _section(text, heading):
    return text.split(heading, 1)[1].split("\n### ", 1)[0]


def test_protocol_says_how_settings_were_chosen(text):
    assert "select-split macro_f1 at the final epoch" in text and "No choice reads a test number" in text


def test_sweeps_and_chosen_settings_per_seed(text):
    sweeps = _section(text, "### Sweeps")
    assert _line(sweeps, "| meta |") == "| meta | optim.lr ∈ [0.001, 0.003]; meta.lr ∈ [0.001, 0.01] | 4 |"
    assert _line(sweeps, "| ce |") == "| ce | optim.lr ∈ [0.001, 0.003] | 2 |"  # meta.lr is not ce's
    chosen = _section(text, "### Chosen setting per seed")
    assert "| meta | optim.lr=0.001, meta.lr=0.01 (0.9000) | optim.lr=0.003, meta.lr=0.001 (0.9000) |" in chosen
    assert "| ce | optim.lr=0.001 (0.7000) | optim.lr=0.003 (0.6000) |" in chosen


def test_test_metrics_are_those_of_the_chosen_runs(text):
    table = _section(text, "### Test metrics of the chosen settings")
    mean, std, lo, hi = mean_interval([0.50, 0.60])
    assert f"| ce | 2 | {mean:.4f} ± {std:.4f} [{lo:.4f}, {hi:.4f}] |" in table
    assert "| focal ★ | 2 | 0.6700 ±" in table  # the best fixed baseline, marked
    assert "| CE control of meta (lr × mean meta weight, × 0.400–0.500) | 2 | 0.6000 ±" in table


def test_paired_differences_to_the_best_fixed_baseline_and_to_ce(text):
    vs_best = _section(text, "### Paired difference to best fixed baseline focal")
    d = mean_interval([0.75 - 0.70, 0.62 - 0.64])
    assert f"| meta | {d[0]:+.4f} ± {d[1]:.4f} [{d[2]:+.4f}, {d[3]:+.4f}] (> 0 on 1/2 seeds) |" in vs_best
    vs_ce = _section(text, "### Paired difference to ce")
    assert f"| meta | {(0.25 + 0.02) / 2:+.4f} ±" in vs_ce and "(> 0 on 2/2 seeds)" in vs_ce
    controls = _section(text, "### Meta − its CE control")
    assert f"| meta | {(0.20 - 0.03) / 2:+.4f} ±" in controls
