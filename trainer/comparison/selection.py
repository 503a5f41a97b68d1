"""Choosing each method's settings on the select split -- never on the test split.

Input: a results table, one row per finished-or-not run, with the grid values of the run (the *cell* keys say which
method it is, the *tuned* keys which setting of that method), its seed, its status, and its select-split score
``select_<metric>`` (from metrics.json's ``select`` block, written at the final epoch). Output: per (cell, seed) the
chosen run, and which fixed-loss cell is the "best fixed baseline" -- chosen the same way.

Only :func:`selection_view` reads a row, and it keeps the select score and the identifying columns only: no test
number can reach a choice (tests/test_selection.py changes every test value and checks that no choice moves).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

LOSS_KEY = "train.loss"
VARIANT_KEY = "data.baselines_use_meta_split"
# metrics where smaller is better; every other selection metric is maximised
LOWER_IS_BETTER = frozenset({"ece", "loss"})


def select_column(metric: str) -> str:
    return f"select_{metric}"


@dataclass(frozen=True)
class Choice:
    cell: tuple[tuple[str, Any], ...]     # (key, value) of every cell key, in order
    seed: int
    setting: tuple[tuple[str, Any], ...]  # (key, value) of every tuned key: the chosen one
    run: str
    score: float                          # its select-split score
    considered: int                       # finished settings it was chosen from
    planned: int                          # settings in the sweep (considered < planned: the sweep is incomplete)

    @property
    def cell_dict(self) -> dict[str, Any]:
        return dict(self.cell)


def _finite(x) -> bool:
    try:
        return x is not None and x != "" and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def selection_view(row: dict, cell_keys: Sequence[str], tune_keys: Sequence[str], metric: str) -> dict:
    """The only columns a choice may depend on: identity (run, cell, setting, seed), status and the select score."""
    col = select_column(metric)
    return {"run": row["run"], "cell": tuple((k, row.get(k)) for k in cell_keys),
            "setting": tuple((k, row.get(k)) for k in tune_keys), "seed": int(row["seed"]),
            "done": row.get("status") == "done", "score": float(row[col]) if _finite(row.get(col)) else None}


def _better(a: float, b: float, metric: str) -> bool:
    return a < b if metric in LOWER_IS_BETTER else a > b


def choose_settings(rows: Iterable[dict], cell_keys: Sequence[str], tune_keys: Sequence[str],
                    metric: str) -> dict[tuple, Choice]:
    """Per (cell, seed): the finished run with the best select score; ties go to the earlier row (the sweep order),
    so the choice is deterministic. A (cell, seed) with no finished, scored run has no choice."""
    views = [selection_view(r, cell_keys, tune_keys, metric) for r in rows]
    planned: dict[tuple, int] = {}
    best: dict[tuple, dict] = {}
    considered: dict[tuple, int] = {}
    for v in views:
        key = (v["cell"], v["seed"])
        planned[key] = planned.get(key, 0) + 1
        if not v["done"] or v["score"] is None:
            continue
        considered[key] = considered.get(key, 0) + 1
        if key not in best or _better(v["score"], best[key]["score"], metric):
            best[key] = v
    return {key: Choice(cell=v["cell"], seed=v["seed"], setting=v["setting"], run=v["run"], score=v["score"],
                        considered=considered[key], planned=planned[key]) for key, v in best.items()}


def is_fixed_loss(cell: tuple[tuple[str, Any], ...]) -> bool:
    return dict(cell).get(LOSS_KEY) != "meta"


def best_cell(choices: dict[tuple, Choice], metric: str,
              among: Callable[[tuple], bool] = is_fixed_loss) -> tuple | None:
    """The cell (of those ``among`` accepts) whose chosen runs have the best mean select score over its seeds --
    the "best fixed baseline" by default. Ties go to the cell seen first."""
    scores: dict[tuple, list[float]] = {}
    for (cell, _seed), c in choices.items():
        if among(cell):
            scores.setdefault(cell, []).append(c.score)
    best, best_mean = None, None
    for cell, values in scores.items():
        mean = sum(values) / len(values)
        if best is None or _better(mean, best_mean, metric):
            best, best_mean = cell, mean
    return best


def variant_groups(choices: dict[tuple, Choice]) -> dict[Any, Callable[[tuple], bool]]:
    """One fixed-loss filter per value of data.baselines_use_meta_split in the cells (both variants reported), or
    a single group when the study does not vary it."""
    values = sorted({dict(c).get(VARIANT_KEY) for c, _ in choices if VARIANT_KEY in dict(c)}, key=str)
    if len(values) < 2:
        return {None: is_fixed_loss}
    return {v: (lambda cell, v=v: is_fixed_loss(cell) and dict(cell).get(VARIANT_KEY) == v) for v in values}
