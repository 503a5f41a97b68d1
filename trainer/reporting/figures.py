"""Report figures (PNG) and the TensorBoard confusion-matrix image, drawn with matplotlib's Agg canvas.

The ``plot_*`` functions take plain data (lists / numpy arrays keyed by a run label); ``draw_report_figures`` picks
that data out of already-validated runs (``trainer.reporting.report.RunResult``) and decides which runs to skip, with a note. We build ``matplotlib.figure.Figure`` objects on an
explicit ``FigureCanvasAgg`` instead of using ``pyplot``: no global figure registry to leak across many plots, no
backend selection that could fail on a headless node, and safe to call from a training process.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Figures are ~840 x 540 px: readable when embedded in Markdown, small enough to keep run dirs light.
_FIGSIZE = (7.0, 4.5)
_DPI = 120


def _new_figure(figsize=_FIGSIZE, dpi=_DPI) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _draw_confusion(ax, cm: np.ndarray, class_names: Sequence[str], title: str) -> None:
    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    if cm.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"confusion matrix of shape {cm.shape} does not match {len(class_names)} class names")
    # Colour by row-normalised counts (= recall per cell): with imbalanced grades raw counts would paint the
    # majority class only, hiding how the rare grades are confused.
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=30, ha="right", fontsize=8)
    ax.set_yticklabels(class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)


def confusion_image(cm, class_names: Sequence[str], title: str = "confusion (rows = truth)") -> np.ndarray:
    """The confusion matrix rendered to an H x W x 3 uint8 RGB array (for TensorBoard's ``add_image``)."""
    fig = _new_figure(figsize=(5.5, 4.5), dpi=100)
    _draw_confusion(fig.add_subplot(1, 1, 1), cm, class_names, title)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def plot_confusion(cm, class_names: Sequence[str], title: str, path: Path) -> Path:
    fig = _new_figure(figsize=(6.0, 5.0))
    _draw_confusion(fig.add_subplot(1, 1, 1), cm, class_names, title)
    return _save(fig, path)


def plot_meta_weights(series: Mapping[str, tuple], path: Path) -> Path:
    """(a) meta-weight evolution. ``series[label] = (steps, w_mean, w_std)``; std band drawn as mean ± std."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, (steps, mean, std) in series.items():
        steps, mean, std = (np.asarray(a, dtype=np.float64) for a in (steps, mean, std))
        (line,) = ax.plot(steps, mean, label=f"{label} mean")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.25, label=f"{label} ± std")
    return _label_and_save(fig, ax, "training step", "meta weight", "Meta-weight evolution", path)


def plot_val_accuracy(series: Mapping[str, tuple], path: Path) -> Path:
    """(b) validation accuracy per epoch. ``series[label] = (epochs, accuracy)``."""
    return _per_epoch_plot(series, "validation accuracy", "Validation accuracy per epoch", path)


def plot_meta_loss(series: Mapping[str, tuple], path: Path) -> Path:
    """(c) loss on the whole meta-validation split, evaluated at each epoch's end: ``series[label] = (epochs,
    loss)``. The same quantity for every run -- a meta run's per-step meta-*batch* loss (taken at the look-ahead
    weights, on one batch) is not comparable with it, so it is not drawn here."""
    return _per_epoch_plot(series, "meta-validation split loss", "Meta-validation split loss per epoch", path)


def _per_epoch_plot(series: Mapping[str, tuple], ylabel: str, title: str, path: Path) -> Path:
    """One marked line per run over whole epochs: ``series[label] = (epochs, values)``."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, (epochs, values) in series.items():
        ax.plot(epochs, values, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return _label_and_save(fig, ax, "epoch", ylabel, title, path)


def _label_and_save(fig: Figure, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_class_recall(recalls: Mapping[str, Sequence[float]], class_names: Sequence[str], path: Path) -> Path:
    """(d) per-class test recall, one bar per run side by side within each class."""
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    k = len(class_names)
    n_runs = max(len(recalls), 1)
    width = 0.8 / n_runs
    x = np.arange(k)
    for r, (label, rec) in enumerate(recalls.items()):
        rec = np.asarray(rec, dtype=np.float64)
        if rec.shape != (k,):
            raise ValueError(f"run {label!r}: {rec.shape[0]} recall values for {k} classes")
        bars = ax.bar(x + (r - (n_runs - 1) / 2) * width, rec, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(class_names, rotation=20, ha="right")
    ax.set_ylim(0.0, 1.1)
    ax.set_ylabel("test recall")
    ax.set_title("Per-class recall")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)




def validation_loss_series(runs) -> tuple[dict[str, tuple], list[str]]:
    """Figure (c)'s data: each run's loss on the meta-validation split at each epoch end ({label: (epochs, loss)})
    and a note per run that has none."""
    series, notes = {}, []
    for r in runs:
        epochs = [e for e in r.metrics["history"] if e["val"].get("loss") is not None]
        if epochs:
            series[r.label] = ([e["epoch"] for e in epochs], [e["val"]["loss"] for e in epochs])
        else:
            notes.append(f"{r.label} has no per-epoch validation loss; skipped.")
    return series, notes


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


def draw_report_figures(runs, fig_dir: Path) -> list[tuple[str, Path | None, list[str]]]:
    """Every report figure for ``trainer.reporting.report.RunResult``-like runs (``label``, ``name``, ``metrics``, ``test``,
    ``class_names``). Returns (title, path or None when no run has data, notes about skipped runs) per figure."""
    out = []
    weights, notes = {}, []
    for r in runs:
        pts = [e for e in r.metrics["step_history"] if e.get("w_mean") is not None]
        if pts:
            weights[r.label] = ([e["step"] for e in pts], [e["w_mean"] for e in pts],
                                [e.get("w_std") or 0.0 for e in pts])
        else:
            notes.append(f"{r.label} has no meta weights (loss '{r.metrics['loss']}'); skipped.")
    out.append(("(a) Meta-weight evolution (mean ± std per step)",
                plot_meta_weights(weights, fig_dir / "meta_weights.png") if weights else None, notes))

    acc, notes = {}, []
    for r in runs:
        if r.metrics["history"]:
            acc[r.label] = ([e["epoch"] for e in r.metrics["history"]],
                            [e["val"]["accuracy"] for e in r.metrics["history"]])
        else:
            notes.append(f"{r.label} has no per-epoch validation history; skipped.")
    out.append(("(b) Validation accuracy per epoch",
                plot_val_accuracy(acc, fig_dir / "val_accuracy.png") if acc else None, notes))

    loss, notes = validation_loss_series(runs)
    out.append(("(c) Meta-validation split loss per epoch (every run evaluated the same way)",
                plot_meta_loss(loss, fig_dir / "meta_loss.png") if loss else None, notes))

    recalls = {r.label: r.test["per_class_recall"] for r in runs}
    out.append(("(d) Per-class test recall",
                plot_class_recall(recalls, runs[0].class_names, fig_dir / "class_recall.png"), []))
    for r in runs:
        path = fig_dir / f"confusion_{r.label.split(':')[0]}_{_safe(r.name)}.png"
        out.append((f"Confusion matrix, {r.label} (test, rows = truth)",
                    plot_confusion(r.test["confusion"], r.class_names, f"{r.label} — test", path), []))
    return out
