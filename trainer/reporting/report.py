"""`metaloss report`: compare finished runs from their run dirs alone (Table I / II, bootstrap CIs, figures).

Reads, per run dir, ``metrics.json`` and ``predictions_test.csv`` (both written by the trainer; formats below) and
writes one Markdown file plus PNG figures next to it. The readers validate everything they use and report every
problem at once, naming the file and the dotted key / line, because a report is usually made long after training
and a traceback from deep inside a table formatter would not say which run is broken.

``metrics.json``: run, num_classes, class_names, loss, test{accuracy, macro_f1, weighted_f1, qwk, per_class_recall,
per_class_precision, per_class_f1, support, confusion, n, loss?}, history[{epoch, step, val{same as test}, ...}],
step_history[{step, meta_loss?, w_mean?, w_std?, ...}], and optionally train_img_per_s, steps, wall_s, bad_steps.
``predictions_test.csv``: header ``source_id,label,pred,prob_0,...,prob_{K-1}``, one row per test image.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from trainer.comparison.control import read_control_record
from trainer.reporting import figures
from trainer.reporting.comparable import same_test_set, test_set_warning  # noqa: F401 -- test_set_warning: CLI
from trainer.reporting.clinical_report import clinical_table_markdown
from trainer.metrics import confusion_matrix, metrics_from_confusion
from common.errors import UserError

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions_test.csv"

_TOP_KEYS = ("run", "num_classes", "class_names", "loss", "test", "history", "step_history")
_SCALAR_METRICS = ("accuracy", "macro_f1", "weighted_f1", "qwk", "n")
_PER_CLASS_METRICS = ("per_class_recall", "per_class_precision", "per_class_f1", "support")
_OPTIONAL_NUMBERS = ("train_img_per_s", "steps", "wall_s", "bad_steps")
_MAX_LISTED = 20  # problems listed in one error; the rest are counted
_BOOT_CHUNK = 64  # bootstrap resamples drawn per chunk: bounds memory at 64 x n indices for large test sets


class ReportInputError(UserError, ValueError):
    """A run dir the report cannot use; the message names the file and every offending key or line."""


def _raise(path: Path, problems: list[str]) -> None:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise ReportInputError(f"{path}: " + "\n  ".join(["invalid run file:", *shown]) + more)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- readers
def _check_metric_block(block, where: str, k: int, problems: list[str]) -> None:
    if not isinstance(block, dict):
        problems.append(f"'{where}' must be an object, got {type(block).__name__}")
        return
    for key in _SCALAR_METRICS:
        if key not in block:
            problems.append(f"missing key '{where}.{key}'")
        elif not _is_number(block[key]):
            problems.append(f"'{where}.{key}' must be a number, got {block[key]!r}")
    for key in _PER_CLASS_METRICS:
        if key not in block:
            problems.append(f"missing key '{where}.{key}'")
        elif not (isinstance(block[key], list) and len(block[key]) == k and all(map(_is_number, block[key]))):
            problems.append(f"'{where}.{key}' must be a list of {k} numbers, got {block[key]!r}")
    cm = block.get("confusion")
    if "confusion" not in block:
        problems.append(f"missing key '{where}.confusion'")
    elif not (isinstance(cm, list) and len(cm) == k and all(
            isinstance(row, list) and len(row) == k and all(isinstance(c, int) and c >= 0 for c in row)
            for row in cm)):
        problems.append(f"'{where}.confusion' must be a {k} x {k} list of non-negative integers")
    if block.get("loss") is not None and not _is_number(block["loss"]):
        problems.append(f"'{where}.loss' must be a number or null, got {block['loss']!r}")


def load_metrics_json(path: Path) -> dict:
    """Parse and validate one ``metrics.json``; raises ``ReportInputError`` naming the file and keys."""
    path = Path(path)
    if not path.is_file():
        raise ReportInputError(f"{path}: not found (a finished run dir holds {METRICS_FILE}; did training complete?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ReportInputError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    problems = [f"missing key '{key}'" for key in _TOP_KEYS if key not in data]
    k = data.get("num_classes")
    if "num_classes" in data and not (isinstance(k, int) and not isinstance(k, bool) and k >= 2):
        problems.append(f"'num_classes' must be an integer >= 2, got {k!r}")
    if problems:  # the remaining checks need num_classes and the sections
        _raise(path, problems)
    names = data["class_names"]
    if not (isinstance(names, list) and len(names) == k and all(isinstance(s, str) for s in names)):
        problems.append(f"'class_names' must be a list of {k} strings, got {names!r}")
    _check_metric_block(data["test"], "test", k, problems)
    for section in ("history", "step_history"):
        if not isinstance(data[section], list):
            problems.append(f"'{section}' must be a list, got {type(data[section]).__name__}")
    if isinstance(data["history"], list):
        for i, entry in enumerate(data["history"]):
            where = f"history[{i}]"
            if not isinstance(entry, dict):
                problems.append(f"'{where}' must be an object")
                continue
            for key in ("epoch", "step"):
                if not _is_number(entry.get(key)):
                    problems.append(f"missing or non-numeric key '{where}.{key}'")
            if "val" not in entry:
                problems.append(f"missing key '{where}.val'")
            else:
                _check_metric_block(entry["val"], f"{where}.val", k, problems)
    if isinstance(data["step_history"], list):
        for i, entry in enumerate(data["step_history"]):
            where = f"step_history[{i}]"
            if not isinstance(entry, dict) or not _is_number(entry.get("step")):
                problems.append(f"'{where}' must be an object with a numeric 'step'")
                continue
            for key, v in entry.items():
                if v is not None and not _is_number(v):
                    problems.append(f"'{where}.{key}' must be a number or null, got {v!r}")
    for key in _OPTIONAL_NUMBERS:
        if data.get(key) is not None and not _is_number(data[key]):
            problems.append(f"'{key}' must be a number or null, got {data[key]!r}")
    if problems:
        _raise(path, problems)
    return data


def load_predictions_csv(path: Path, num_classes: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(source_ids, labels int64, preds int64, probs float64 n x K); raises ``ReportInputError`` naming bad lines."""
    path = Path(path)
    if not path.is_file():
        raise ReportInputError(f"{path}: not found (the trainer writes {PREDICTIONS_FILE} after the test evaluation)")
    expected = ["source_id", "label", "pred"] + [f"prob_{c}" for c in range(num_classes)]
    ids, labels, preds, probs, problems = [], [], [], [], []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != expected:
            raise ReportInputError(f"{path}: header must be {','.join(expected)} (num_classes={num_classes}), "
                              f"got {','.join(header) if header else '<empty file>'}")
        for line_no, row in enumerate(reader, start=2):
            if len(row) != len(expected):
                problems.append(f"line {line_no}: {len(row)} fields, expected {len(expected)}")
                continue
            try:
                label, pred = int(row[1]), int(row[2])
                p = [float(x) for x in row[3:]]
            except ValueError:
                problems.append(f"line {line_no}: label/pred must be integers and prob_* numbers, got {row[1:]}")
                continue
            if not (0 <= label < num_classes and 0 <= pred < num_classes):
                problems.append(f"line {line_no}: label {label} / pred {pred} outside 0..{num_classes - 1}")
                continue
            ids.append(row[0])
            labels.append(label)
            preds.append(pred)
            probs.append(p)
    if problems:
        _raise(path, problems)
    if not labels:
        raise ReportInputError(f"{path}: no prediction rows after the header")
    return (ids, np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64),
            np.asarray(probs, dtype=np.float64).reshape(len(labels), num_classes))


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict                      # validated metrics.json
    source_ids: list[str]
    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray
    label: str = ""                    # "A: <name>" once runs are compared (set by `_as_runs`)

    @property
    def name(self) -> str:
        return str(self.metrics["run"])

    @property
    def class_names(self) -> list[str]:
        return list(self.metrics["class_names"])

    @property
    def test(self) -> dict:
        return self.metrics["test"]


def load_run(run_dir) -> RunResult:
    """Both files of one run dir, cross-checked: the predictions must reproduce ``test.confusion``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportInputError(f"{run_dir}: run dir not found")
    metrics_path, preds_path = run_dir / METRICS_FILE, run_dir / PREDICTIONS_FILE
    data = load_metrics_json(metrics_path)
    k = data["num_classes"]
    ids, y_true, y_pred, probs = load_predictions_csv(preds_path, k)
    cm = confusion_matrix(y_true, y_pred, k)
    if cm.tolist() != data["test"]["confusion"]:
        # Tables come from metrics.json and CIs from the CSV: they must describe the same evaluation.
        raise ReportInputError(f"{preds_path}: its {len(y_true)} predictions give confusion {cm.tolist()}, but "
                          f"{metrics_path} has test.confusion {data['test']['confusion']} (files from different "
                          f"evaluations?)")
    return RunResult(run_dir, data, ids, y_true, y_pred, probs)


def _as_runs(runs) -> list[RunResult]:
    out = [r if isinstance(r, RunResult) else load_run(r) for r in runs]
    if not out:
        raise ValueError("no run dirs given")
    first = out[0]
    for r in out[1:]:
        if r.class_names != first.class_names:
            raise ReportInputError(f"{r.run_dir / METRICS_FILE}: class_names {r.class_names} differ from "
                              f"{first.class_names} in {first.run_dir / METRICS_FILE}; runs are not comparable")
    for i, r in enumerate(out):
        r.label = f"{chr(ord('A') + i) if i < 26 else f'R{i + 1}'}: {r.name}"
    return out


# --- bootstrap
def _resample_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of bootstrap index rows; the same (n, n_boot, seed) always yields the same rows in the same order."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(_BOOT_CHUNK, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _check_boot_args(y_true, y_pred, n_boot: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or y_true.size == 0:
        raise ValueError(f"bootstrap needs two equal-length non-empty 1-d arrays, got {y_true.shape} and "
                         f"{y_pred.shape}")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"bootstrap needs n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    return y_true, y_pred


def _percentiles(stats: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.percentile(stats, [100.0 * alpha / 2, 100.0 * (1.0 - alpha / 2)], axis=0)
    return lo, hi


def bootstrap_ci(y_true, y_pred, metric_fn: Callable[[np.ndarray, np.ndarray], float], n_boot: int, seed: int,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """(point estimate, lo, hi): percentile interval of ``metric_fn`` over ``n_boot`` resamples with replacement."""
    y_true, y_pred = _check_boot_args(y_true, y_pred, n_boot, alpha)
    stats = [metric_fn(y_true[idx], y_pred[idx]) for chunk in _resample_indices(len(y_true), n_boot, seed)
             for idx in chunk]
    lo, hi = _percentiles(np.asarray(stats, dtype=np.float64), alpha)
    return float(metric_fn(y_true, y_pred)), float(lo), float(hi)


def bootstrap_report_cis(y_true, y_pred, num_classes: int, n_boot: int, seed: int,
                         alpha: float = 0.05) -> dict[str, tuple]:
    """CIs for accuracy, macro-F1 and each class's recall from ONE set of resamples (paired across metrics).

    Same resamples and values as ``bootstrap_ci`` with the same seed, but each resample's confusion matrix is
    built with one bincount, so K + 2 metrics cost one pass instead of K + 2.
    Returns {"accuracy": (p, lo, hi), "macro_f1": (...), "per_class_recall": [(p, lo, hi)] * K}.
    """
    y_true, y_pred = _check_boot_args(y_true, y_pred, n_boot, alpha)
    k = num_classes
    rows = []
    for idx in _resample_indices(len(y_true), n_boot, seed):
        flat = (np.arange(len(idx))[:, None] * k * k + y_true[idx] * k + y_pred[idx]).ravel()
        for cm in np.bincount(flat, minlength=len(idx) * k * k).reshape(len(idx), k, k):
            m = metrics_from_confusion(cm)
            rows.append([m["accuracy"], m["macro_f1"], *m["per_class_recall"]])
    lo, hi = _percentiles(np.asarray(rows, dtype=np.float64), alpha)
    point = metrics_from_confusion(confusion_matrix(y_true, y_pred, k))
    p = [point["accuracy"], point["macro_f1"], *point["per_class_recall"]]
    cis = [(float(a), float(b), float(c)) for a, b, c in zip(p, lo, hi)]
    return {"accuracy": cis[0], "macro_f1": cis[1], "per_class_recall": cis[2:]}


# --- Markdown
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _row(cells) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list], right_from: int) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return "\n".join([_row(header), "|" + "|".join(align) + "|", *(_row(r) for r in rows)])


def _f(x: float) -> str:
    return f"{x:.4f}"


def _d(x: float) -> str:
    return f"{x:+.4f}"


_TABLE_ONE_COLS = (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("weighted_f1", "Weighted-F1"), ("qwk", "QWK"))


def table_one_markdown(runs) -> str:
    """Table I: overall test metrics per run, plus "B − A" (last minus first) when exactly two runs are given.

    ``runs`` are ``RunResult``s or run dirs."""
    runs = _as_runs(runs)
    rows = [[r.label, r.metrics["loss"], *(_f(r.test[key]) for key, _ in _TABLE_ONE_COLS)] for r in runs]
    if len(runs) == 2 and same_test_set(runs):
        a, b = runs
        rows.append(["B − A", "", *(_d(b.test[key] - a.test[key]) for key, _ in _TABLE_ONE_COLS)])
    return _table(["Run", "Loss", *(title for _, title in _TABLE_ONE_COLS)], rows, right_from=2)


def table_two_markdown(runs) -> str:
    """Table II: per-class support and test recall per run (+ "B − A" column for two runs)."""
    runs = _as_runs(runs)
    diff_col = len(runs) == 2 and same_test_set(runs)
    same_support = all(r.test["support"] == runs[0].test["support"] for r in runs)
    support_cols = ["Support"] if same_support else [f"Support {r.label}" for r in runs]
    header = ["Class", *support_cols, *(f"Recall {r.label}" for r in runs)] + (["B − A"] if diff_col else [])
    rows = []
    for c, name in enumerate(runs[0].class_names):
        supports = [runs[0].test["support"][c]] if same_support else [r.test["support"][c] for r in runs]
        recalls = [r.test["per_class_recall"][c] for r in runs]
        diff = [_d(recalls[1] - recalls[0])] if diff_col else []
        rows.append([name, *(str(int(s)) for s in supports), *(_f(x) for x in recalls), *diff])
    return _table(header, rows, right_from=1)


def ci_table_markdown(runs, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> str:
    """Point estimate [lo, hi] per run for accuracy, macro-F1 and each class's recall."""
    runs = _as_runs(runs)
    cis = [bootstrap_report_cis(r.y_true, r.y_pred, len(r.class_names), n_boot, seed, alpha) for r in runs]
    fmt = lambda t: f"{_f(t[0])} [{_f(t[1])}, {_f(t[2])}]"  # noqa: E731
    rows = [["Accuracy", *(fmt(ci["accuracy"]) for ci in cis)], ["Macro-F1", *(fmt(ci["macro_f1"]) for ci in cis)]]
    rows += [[f"Recall {name}", *(fmt(ci["per_class_recall"][c]) for ci in cis)]
             for c, name in enumerate(runs[0].class_names)]
    return _table(["Metric", *(r.label for r in runs)], rows, right_from=1)


# --- report
def _run_summary(r: RunResult) -> str:
    m = r.metrics
    parts = [f"loss `{m['loss']}`", f"test n = {m['test']['n']}"]
    for key, fmt in (("steps", "{} steps"), ("wall_s", "{:.0f} s wall"), ("train_img_per_s", "{:.1f} img/s"),
                     ("bad_steps", "{} bad steps")):
        if m.get(key) is not None:
            parts.append(fmt.format(m[key]))
    if m.get("meta_weight_mean") is not None:
        parts.append(f"mean meta weight {m['meta_weight_mean']:.4f}")
    control = read_control_record(r.run_dir)
    if control is not None:
        parts.append(f"CE control of `{control['control_of']}` (lr {control['lr']:.3g} = its lr × "
                     f"{control['meta_weight_mean']:.4f})")
    return f"- **{r.label}** (`{r.run_dir}`): " + ", ".join(parts)


def write_report(run_dirs: list[Path], out: Path | None = None, *, n_boot: int = 1000, seed: int = 0) -> Path:
    """Write the Markdown report (default: first run dir / report.md) and its figures (``out.parent/figures``)."""
    runs = _as_runs(run_dirs)
    out = Path(out) if out is not None else runs[0].run_dir / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = out.parent / "figures"
    lines = ["# metaloss report", "", "## Runs", "", *(_run_summary(r) for r in runs), ""]
    warning = test_set_warning(runs)
    if warning:
        lines += [f"**Warning:** {warning}.", ""]
    elif len(runs) == 2:
        lines += ["Differences are **B − A** (the last run minus the first).", ""]
    lines += ["## Table I — test metrics", "", table_one_markdown(runs), "",
              "## Table II — per-class test recall", "", table_two_markdown(runs), "",
              f"## 95% bootstrap confidence intervals (percentile, {n_boot} resamples of the test predictions, "
              f"seed {seed})", "", ci_table_markdown(runs, n_boot=n_boot, seed=seed), "",
              "## Clinical metrics (referable DR = grade >= threshold; 95% bootstrap intervals)", "",
              clinical_table_markdown(runs, n_boot=n_boot, seed=seed, table=_table), "", "## Figures", ""]
    for title, path, notes in figures.draw_report_figures(runs, fig_dir):
        lines.append(f"### {title}")
        lines.append("")
        if path is not None:
            rel = path.relative_to(out.parent).as_posix()
            lines += [f"![{title}]({rel})", ""]
        else:
            lines += ["No run has data for this figure.", ""]
        lines += [f"_Note: {n}_" for n in notes] + ([""] if notes else [])
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out
