"""``study/report.md``: per cell mean ± std and a 95% t-interval across seeds, the paired comparison of every loss
against ``ce`` over the same seeds, and the figures (metric vs train fraction, img/s and scaling efficiency vs world
size). Everything is computed from the rows of results.csv, i.e. from finished runs only.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from launch.study.spec import FRACTION_KEY, Study
from trainer.comparison.report import mean_interval  # one definition of the 95% t-interval

_SUMMARY = ("qwk", "referable_auc", "ece", "img_per_s")
LOSS_KEY = "train.loss"


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std, lo, hi = mean_interval(values)
    ci = f" [{lo:.4f}, {hi:.4f}]" if lo is not None else ""
    return f"{mean:.4f} ± {std:.4f}{ci}"


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def _cells(study: Study, rows: list[dict]) -> dict[tuple, list[dict]]:
    """Finished rows grouped by (grid values..., world size), in the study's order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = tuple(row[k] for k in study.grid) + (row["world_size"],)
        groups.setdefault(key, [])
        if row["status"] == "done":
            groups[key].append(row)
    return groups


def _vals(rows: list[dict], metric: str) -> list[float]:
    return [float(r[metric]) for r in rows if r.get(metric) is not None]


def cell_table(study: Study, rows: list[dict]) -> str:
    cols = [study.metric, *(m for m in _SUMMARY if m != study.metric)]
    header = [*study.grid, "world size", "seeds done", *cols]
    body = [[*key, len(done), *(_fmt(_vals(done, m)) for m in cols)] for key, done in _cells(study, rows).items()]
    return _table(header, body)


def paired_vs_ce(study: Study, rows: list[dict]) -> tuple[str, list[dict]]:
    """Per other-loss and context (the other grid values + world size): metric(loss) - metric(ce) on the same seed."""
    if LOSS_KEY not in study.grid or "ce" not in study.grid[LOSS_KEY]:
        return "No `train.loss` grid with `ce` in it: no paired comparison.", []
    context_keys = [k for k in study.grid if k != LOSS_KEY] + ["world_size"]
    by = defaultdict(dict)
    for r in rows:
        if r["status"] == "done" and r.get(study.metric) is not None:
            by[(r[LOSS_KEY], *(r[k] for k in context_keys))][r["seed"]] = float(r[study.metric])
    results = []
    for loss in study.grid[LOSS_KEY]:
        if loss == "ce":
            continue
        for key in sorted({k[1:] for k in by if k[0] == loss}, key=str):
            mine, ce = by[(loss, *key)], by.get(("ce", *key), {})
            seeds = sorted(set(mine) & set(ce))
            if not seeds:
                continue
            diffs = [mine[s] - ce[s] for s in seeds]
            mean, std, lo, hi = mean_interval(diffs)
            results.append({"loss": loss, "context": dict(zip(context_keys, key)), "seeds": seeds, "mean": mean,
                            "std": std, "lo": lo, "hi": hi, "wins": sum(d > 0 for d in diffs)})
    header = ["loss", *(k.replace("world_size", "world size") for k in context_keys), "pairs (seeds)",
              f"Δ {study.metric} mean ± std", "95% interval", "loss > ce"]
    body = [[r["loss"], *r["context"].values(), len(r["seeds"]), f"{r['mean']:+.4f} ± {r['std']:.4f}",
             f"[{r['lo']:+.4f}, {r['hi']:+.4f}]" if r["lo"] is not None else "–", f"{r['wins']}/{len(r['seeds'])}"]
            for r in results]
    return (_table(header, body) if body else "No seed has both the loss and `ce` finished yet."), results


def _line_label(study: Study, key: dict, skip: tuple[str, ...]) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in key.items() if k not in skip]
    return ", ".join(parts) or "all"


def draw_figures(study: Study, rows: list[dict], fig_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if r["status"] == "done"]
    out = []
    if FRACTION_KEY in study.grid and done:
        smallest_ws = min(study.world_sizes)
        lines = defaultdict(lambda: defaultdict(list))
        for r in done:
            if r["world_size"] == smallest_ws and r.get(study.metric) is not None:
                label = _line_label(study, {k: r[k] for k in study.grid}, (FRACTION_KEY,))
                lines[label][float(r[FRACTION_KEY])].append(float(r[study.metric]))
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in lines.items():
            xs = sorted(pts)
            stats = [mean_interval(pts[x]) for x in xs]
            ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=label)
        ax.set_xlabel("train fraction")
        ax.set_ylabel(f"test {study.metric} (mean ± std over seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        path = fig_dir / f"{study.metric}_vs_train_fraction.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append((f"Test {study.metric} vs train fraction (one line per loss)", path))
    if done:
        lines = defaultdict(lambda: defaultdict(list))
        for r in done:
            if r.get("img_per_s") is not None:
                label = _line_label(study, {k: r[k] for k in study.grid}, ())
                lines[label][int(r["world_size"])].append(float(r["img_per_s"]))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for label, pts in lines.items():
            ws = sorted(pts)
            thr = [float(np.mean(pts[w])) for w in ws]
            a1.plot(ws, thr, marker="o", label=label)
            # efficiency against the smallest world size measured: 1.0 = perfectly linear scaling
            a2.plot(ws, [t / (thr[0] * w / ws[0]) for t, w in zip(thr, ws)], marker="o", label=label)
        a1.set_xlabel("world size (processes)")
        a1.set_ylabel("training img/s (mean over seeds)")
        a2.set_xlabel("world size (processes)")
        a2.set_ylabel("scaling efficiency")
        a2.axhline(1.0, color="grey", lw=0.8, ls="--")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.set_xticks(sorted(study.world_sizes))
        a1.legend(fontsize=7)
        path = fig_dir / "throughput_vs_world_size.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(("Training img/s and scaling efficiency vs world size", path))
    return out


def write_study_report(study: Study, rows: list[dict], command: str) -> Path:
    out = study.state_dir / "report.md"
    all_rows, rows = rows, [r for r in rows if not r.get("control_of")]  # CE controls: comparison section only
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    paired, _ = paired_vs_ce(study, rows)
    lines = [f"# Study `{study.name}`", "", f"- study file: `{study.path}`; base config: `{study.base}`",
             f"- command: `{command}`", f"- runs: {len(rows)} ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
             f"seeds {study.seeds}; data.split_seed {study.split_seed} (the same test images for every run)",
             f"- results: `{study.state_dir / 'results.csv'}`", "",
             f"## Per cell: mean ± std [95% t-interval] across seeds (test split)", "", cell_table(study, rows), "",
             f"## Paired comparison against `ce` ({study.metric}, same seeds, loss − ce)", "", paired, ""]
    if study.selection is not None:
        from launch.study.selection import comparison_section

        # the tables above show every run of the grid; this section only the settings chosen on the select split
        lines += [comparison_section(study, all_rows), ""]
    lines += ["## Figures", ""]
    for title, path in draw_figures(study, rows, study.state_dir / "figures"):
        lines += [f"### {title}", "", f"![{title}]({path.relative_to(study.state_dir).as_posix()})", ""]
    failed = [r for r in all_rows if r["status"] == "failed"]
    if failed:
        lines += ["## Failed runs", "", _table(["run", "error"], [[r["run"], r["error"]] for r in failed]), ""]
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out
