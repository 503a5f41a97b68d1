"""The comparison section of a study report: the protocol, each method's sweep, the setting chosen per seed (on the
select split), the chosen settings' test metrics (mean ± std, 95% t-interval), paired differences against the best
fixed baseline (per variant of data.baselines_use_meta_split) and against CE, and the CE control of every meta
method. Pure: rows in (the study's results table), Markdown out.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from trainer.comparison.relevance import ignored_by
from trainer.comparison.selection import (LOSS_KEY, VARIANT_KEY, Choice, best_cell, choose_settings, is_fixed_loss,
                                          select_column, variant_groups)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float | None, float | None]:
    """(mean, sample std, lo, hi) with the 95% Student-t interval of the mean; no interval from one value."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, 0.0, None, None
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, mean - half, mean + half


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


_SHORT_CLASHES = ("lr",)  # optim.lr and meta.lr both end in "lr": keep the section for those


def _short(key: str) -> str:
    last = key.split(".")[-1]
    return key if last in _SHORT_CLASHES else last


def method_label(cell: tuple[tuple[str, Any], ...]) -> str:
    d = dict(cell)
    loss = str(d.get(LOSS_KEY, "?"))
    parts = [f"{_short(k)}={v}" for k, v in cell if k not in (LOSS_KEY, VARIANT_KEY) and not ignored_by(loss, k)]
    if VARIANT_KEY in d and not ignored_by(loss, VARIANT_KEY):
        parts.append("train∪meta" if d[VARIANT_KEY] in (True, "True", "true") else "train only")
    return loss + (f" ({', '.join(parts)})" if parts else "")


def _setting_text(setting: tuple[tuple[str, Any], ...], loss: str) -> str:
    return ", ".join(f"{_short(k)}={v}" for k, v in setting if not ignored_by(loss, k)) or "–"


def _fmt_interval(values: list[float], signed: bool = False) -> str:
    if not values:
        return "–"
    mean, std, lo, hi = mean_interval(values)
    f = "{:+.4f}" if signed else "{:.4f}"
    ci = f" [{f.format(lo)}, {f.format(hi)}]" if lo is not None else ""
    return f"{f.format(mean)} ± {std:.4f}{ci}"


def _test_values(rows_by_run: dict[str, dict], choices: dict[tuple, Choice], cell, metric: str) -> dict[int, float]:
    out = {}
    for (c, seed), ch in choices.items():
        value = rows_by_run[ch.run].get(metric) if c == cell else None
        if value not in (None, "") and math.isfinite(float(value)):
            out[seed] = float(value)
    return out


def _paired(mine: dict[int, float], ref: dict[int, float]) -> str:
    seeds = sorted(set(mine) & set(ref))
    if not seeds:
        return "–"
    diffs = [mine[s] - ref[s] for s in seeds]
    return f"{_fmt_interval(diffs, signed=True)} (> 0 on {sum(d > 0 for d in diffs)}/{len(seeds)} seeds)"


def comparison_markdown(rows: list[dict], *, cell_keys: Sequence[str], tune_keys: Sequence[str], metric: str,
                        test_metrics: Sequence[str], controls: Sequence[dict] = ()) -> str:
    """``rows``: results rows (grid values, seed, status, run, ``select_<metric>``, test metric columns).
    ``controls``: rows of CE control runs with ``control_of`` (the meta run's name), ``seed``, ``lr``,
    ``meta_weight_mean`` and the test metric columns."""
    choices = choose_settings(rows, cell_keys, tune_keys, metric)
    rows_by_run = {r["run"]: r for r in rows}
    cells = list(dict.fromkeys(c for c, _ in choices))
    seeds = sorted({s for _, s in choices})
    groups = variant_groups(choices)
    best = {v: best_cell(choices, metric, among) for v, among in groups.items()}
    ce_cells = [c for c in cells if dict(c).get(LOSS_KEY) == "ce"]
    lines = ["## Comparison at each method's own best settings", "",
             f"**Protocol.** Every method (a grid cell) is trained once per setting of its sweep "
             f"({', '.join(tune_keys)}; keys a loss does not read are not swept for it) and seed. For each method and "
             f"seed the setting with the best **select-split {metric} at the final epoch** is chosen; the select split "
             f"is trained on by no method (meta-reweighting fits φ on the meta split, so choosing on it would favour "
             f"meta). No choice reads a test number; the tables below show the test metrics of the chosen runs only. "
             f"The *best fixed baseline* is the fixed-loss method whose chosen runs have the best mean select {metric}"
             + (" (one per variant of data.baselines_use_meta_split)" if len(groups) > 1 else "") + ". "
             f"Intervals are 95% Student-t intervals over seeds; differences are paired by seed.", ""]
    sweep_rows = []
    for cell in cells:
        loss = str(dict(cell).get(LOSS_KEY))
        mine = [r for r in rows if tuple((k, r.get(k)) for k in cell_keys) == cell]
        values = {k: sorted({r.get(k) for r in mine}, key=str) for k in tune_keys if not ignored_by(loss, k)}
        planned = max(ch.planned for (c, _), ch in choices.items() if c == cell)
        sweep_rows.append([method_label(cell), "; ".join(f"{_short(k)} ∈ {v}" for k, v in values.items()) or "–",
                           planned])
    lines += ["### Sweeps", "", _table(["method", "swept", "settings"], sweep_rows), ""]
    chosen_rows = []
    for cell in cells:
        loss = str(dict(cell).get(LOSS_KEY))
        cols = []
        for s in seeds:
            ch = choices.get((cell, s))
            cols.append("–" if ch is None else f"{_setting_text(ch.setting, loss)} ({ch.score:.4f}"
                        + (f", {ch.considered}/{ch.planned} finished" if ch.considered < ch.planned else "") + ")")
        chosen_rows.append([method_label(cell), *cols])
    lines += [f"### Chosen setting per seed (select {metric} in brackets)", "",
              _table(["method", *(f"seed {s}" for s in seeds)], chosen_rows), ""]
    marks = {c: " ★" for c in best.values() if c is not None}
    test_rows = []
    for cell in cells:
        vals = {m: _test_values(rows_by_run, choices, cell, m) for m in test_metrics}
        test_rows.append([method_label(cell) + marks.get(cell, ""), len(vals[test_metrics[0]]),
                          *(_fmt_interval(list(vals[m].values())) for m in test_metrics)])
    control_vals = _control_values(controls, choices, test_metrics)
    for cell, (vals, scale) in control_vals.items():
        test_rows.append([f"CE control of {method_label(cell)} (lr × mean meta weight, {scale})",
                          len(vals[test_metrics[0]]), *(_fmt_interval(list(vals[m].values())) for m in test_metrics)])
    star_note = ""
    if marks:
        star_note = "★ = best fixed baseline" + (" (one per data variant). " if len(marks) > 1 else ". ")
    lines += ["### Test metrics of the chosen settings (mean ± std [95% interval] over seeds)", "",
              star_note + "A control row is CE trained exactly like the chosen "
              "meta run but with its learning rate multiplied by that run's mean meta weight; meta − control is what "
              "the look-ahead contributes beyond rescaling the step.", "",
              _table(["method", "seeds", *test_metrics], test_rows), ""]
    refs = [(f"best fixed baseline {method_label(c)}", c) for c in best.values() if c is not None]
    refs += [(method_label(c), c) for c in ce_cells if c not in best.values()]
    for title, ref in refs:
        ref_vals = {m: _test_values(rows_by_run, choices, ref, m) for m in test_metrics}
        body = []
        for cell in cells:
            if cell == ref:
                continue
            vals = {m: _test_values(rows_by_run, choices, cell, m) for m in test_metrics}
            body.append([method_label(cell), *(_paired(vals[m], ref_vals[m]) for m in test_metrics)])
        lines += [f"### Paired difference to {title} (method − reference, same seeds)", "",
                  _table(["method", *(f"Δ {m}" for m in test_metrics)], body), ""]
    if control_vals:
        body = []
        for cell, (vals, _) in control_vals.items():
            meta = {m: _test_values(rows_by_run, choices, cell, m) for m in test_metrics}
            body.append([method_label(cell), *(_paired(meta[m], vals[m]) for m in test_metrics)])
        lines += ["### Meta − its CE control (same seeds)", "", _table(["method", *(f"Δ {m}" for m in test_metrics)],
                                                                       body), ""]
    return "\n".join(lines)


def _control_values(controls: Sequence[dict], choices: dict[tuple, Choice], test_metrics: Sequence[str]
                    ) -> dict[tuple, tuple[dict[str, dict[int, float]], str]]:
    """Per meta cell: the test values of the controls of its chosen runs, by seed, and the range of lr scales."""
    chosen = {ch.run: (c, s) for (c, s), ch in choices.items() if not is_fixed_loss(c)}
    out: dict[tuple, tuple[dict, list]] = {}
    for r in controls:
        if r.get("control_of") not in chosen:
            continue  # the control of a run that was not chosen (e.g. made before the sweep finished)
        cell, seed = chosen[r["control_of"]]
        vals, scales = out.setdefault(cell, ({m: {} for m in test_metrics}, []))
        scales.append(float(r["meta_weight_mean"]))
        for m in test_metrics:
            if r.get(m) not in (None, ""):
                vals[m][seed] = float(r[m])
    return {c: (v, f"× {min(s):.3f}–{max(s):.3f}" if len(s) > 1 else f"× {s[0]:.3f}") for c, (v, s) in out.items()}
