"""Settings are chosen on the select split only: per (cell, seed) by the select score, the best fixed baseline the
same way; no test number can move a choice; grid cells that differ only in keys the loss ignores are dropped."""
from __future__ import annotations

import random

import pytest

from trainer.comparison.relevance import ignored_by, redundant_cell
from trainer.comparison.selection import best_cell, choose_settings, variant_groups

CELL = ["train.loss"]
TUNE = ["optim.lr"]
TEST_COLS = ("macro_f1", "accuracy", "qwk", "ece")


def _row(loss, lr, seed, select, test=0.5, status="done"):
    return {"run": f"{loss}_{lr}_{seed}", "train.loss": loss, "optim.lr": lr, "seed": seed, "status": status,
            "select_macro_f1": select, **{k: test for k in TEST_COLS}}


def _table():
    return [_row("ce", 1e-3, 0, 0.50, test=0.9), _row("ce", 3e-3, 0, 0.60, test=0.1),
            _row("ce", 1e-3, 1, 0.70), _row("ce", 3e-3, 1, 0.40),
            _row("focal", 1e-3, 0, 0.55), _row("focal", 3e-3, 0, 0.65),
            _row("focal", 1e-3, 1, 0.66), _row("focal", 3e-3, 1, None, status="failed"),
            _row("meta", 1e-3, 0, 0.80), _row("meta", 3e-3, 0, 0.20),
            _row("meta", 1e-3, 1, 0.30), _row("meta", 3e-3, 1, 0.30)]


def _summary(choices):
    return {(dict(c.cell)["train.loss"], c.seed): (dict(c.setting)["optim.lr"], c.considered, c.planned)
            for c in choices.values()}


def test_each_cell_and_seed_gets_the_setting_with_the_best_select_score():
    choices = choose_settings(_table(), CELL, TUNE, "macro_f1")
    assert _summary(choices) == {
        ("ce", 0): (3e-3, 2, 2),   # select 0.60 beats 0.50, although its test score is far worse
        ("ce", 1): (1e-3, 2, 2),
        ("focal", 0): (3e-3, 2, 2),
        ("focal", 1): (1e-3, 1, 2),  # the failed setting is not a candidate; the sweep is marked incomplete
        ("meta", 0): (1e-3, 2, 2),
        ("meta", 1): (1e-3, 2, 2),  # a tie goes to the earlier setting of the sweep
    }


def test_lower_is_better_metrics_are_minimised():
    rows = [{**_row("ce", 1e-3, 0, None), "select_ece": 0.2}, {**_row("ce", 3e-3, 0, None), "select_ece": 0.1}]
    (choice,) = choose_settings(rows, CELL, TUNE, "ece").values()
    assert dict(choice.setting)["optim.lr"] == 3e-3


def test_best_fixed_baseline_is_chosen_by_mean_select_score_and_never_meta():
    choices = choose_settings(_table(), CELL, TUNE, "macro_f1")
    # ce: mean(0.60, 0.70) = 0.65; focal: mean(0.65, 0.66) = 0.655; meta (0.80, 0.30) is not a fixed loss
    assert dict(best_cell(choices, "macro_f1"))["train.loss"] == "focal"


def test_changing_test_labels_cannot_change_any_choice():
    """Any change of the test labels changes only test columns: scramble all of them, many times."""
    rng = random.Random(0)
    rows = []
    for loss in ("ce", "focal", "ldam", "meta"):
        for variant in (False, True):
            for lr in (3e-4, 1e-3, 3e-3):
                for seed in range(3):
                    r = _row(loss, lr, seed, rng.random(), status=rng.choice(["done"] * 5 + ["failed"]))
                    rows.append({**r, "data.baselines_use_meta_split": variant})
    cell = ["train.loss", "data.baselines_use_meta_split"]
    before = choose_settings(rows, cell, TUNE, "macro_f1")
    best_before = {v: best_cell(before, "macro_f1", among) for v, among in variant_groups(before).items()}
    assert len(best_before) == 2 and len(before) == 4 * 2 * 3
    for _ in range(20):
        scrambled = [{**r, **{k: rng.choice([rng.random(), None, float("nan"), -1.0]) for k in TEST_COLS},
                      "test": {"macro_f1": rng.random()}} for r in rows]
        after = choose_settings(scrambled, cell, TUNE, "macro_f1")
        assert after == before
        assert {v: best_cell(after, "macro_f1", among) for v, among in variant_groups(after).items()} == best_before


def test_a_cell_with_no_finished_run_has_no_choice():
    rows = [_row("ce", 1e-3, 0, 0.5, status="failed"), _row("ce", 3e-3, 0, 0.6, status="running")]
    assert choose_settings(rows, CELL, TUNE, "macro_f1") == {}


@pytest.mark.parametrize("loss,key,ignored", [
    ("ce", "meta.lr", True), ("meta", "meta.lr", False), ("meta", "data.baselines_use_meta_split", True),
    ("ce", "data.baselines_use_meta_split", False), ("ldam", "loss.ldam_max_margin", False),
    ("focal", "loss.ldam_max_margin", True), ("class_balanced", "loss.focal_gamma", False),
    ("ce", "optim.lr", False), ("meta", "optim.lr", False)])
def test_which_keys_a_loss_ignores(loss, key, ignored):
    assert ignored_by(loss, key) is ignored


def test_redundant_cells_keep_the_first_value_of_an_ignored_key():
    grid = {"train.loss": ["ce", "meta"], "meta.lr": [1e-3, 1e-2], "meta.granularity": ["batch", "class"],
            "data.baselines_use_meta_split": [False, True]}
    import itertools

    kept = [c for c in (dict(zip(grid, v)) for v in itertools.product(*grid.values())) if not redundant_cell(c, grid)]
    assert sorted((c["train.loss"], c["meta.lr"], c["meta.granularity"], c["data.baselines_use_meta_split"])
                  for c in kept) == sorted([
        ("ce", 1e-3, "batch", False), ("ce", 1e-3, "batch", True),
        ("meta", 1e-3, "batch", False), ("meta", 1e-2, "batch", False),
        ("meta", 1e-3, "class", False), ("meta", 1e-2, "class", False)])
    assert not redundant_cell({"meta.lr": 1e-2}, grid)  # loss unknown: nothing is dropped
    assert redundant_cell({"meta.lr": 1e-2}, grid, loss="ce")
