"""`metaloss report` on fake run dirs: tables equal the runs' metrics, CIs behave, figures are real PNGs, bad run
dirs give errors naming the file."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.cli import run_cli
from data_pipeline.records import class_names
from trainer.metrics import compute_metrics
from trainer.reporting.report import (ReportInputError, bootstrap_ci, bootstrap_report_cis, load_run, table_one_markdown,
                            table_two_markdown, write_report)

K = 5
NAMES = class_names(K)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labels_preds(n: int, acc: float, seed: int, label_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """APTOS-like imbalanced labels (the same test set for every run with the same label_seed) and predictions
    that are right with probability ``acc``."""
    y = np.random.default_rng(label_seed).choice(K, size=n, p=[0.5, 0.1, 0.25, 0.06, 0.09])
    rng = np.random.default_rng(seed + 1000)
    wrong = rng.random(n) > acc
    p = np.where(wrong, (y + rng.integers(1, K, n)) % K, y)
    return y, p


def make_run(root: Path, name: str, loss: str, *, acc: float, seed: int, meta: bool, n: int = 300) -> Path:
    """A run dir as the trainer writes it, from random labels/predictions."""
    run = root / name
    run.mkdir(parents=True)
    y, p = _labels_preds(n, acc, seed)
    test = compute_metrics(y, p, K) | {"loss": 0.9}
    history = []
    for epoch in (1, 2, 3):
        vy, vp = _labels_preds(80, acc - 0.1 * (3 - epoch), seed + epoch, label_seed=99)
        history.append({"epoch": epoch, "step": 40 * epoch, "train_loss": 1.5 / epoch,
                        "train_weighted_loss": 1.4 / epoch if meta else None,
                        "meta_loss": 1.3 / epoch if meta else None,
                        "val": compute_metrics(vy, vp, K) | {"loss": 1.2 / epoch}})
    step_history = [{"step": s, "train_loss": 2.0 / s, "weighted_loss": 1.9 / s if meta else None,
                     "meta_loss": 1.8 / s if meta else None, "w_mean": 1.0 + 0.01 * s if meta else None,
                     "w_std": 0.1 if meta else None, "w_min": 0.8 if meta else None, "w_max": 1.2 if meta else None}
                    for s in range(1, 121)]
    metrics = {"run": name, "num_classes": K, "class_names": NAMES, "loss": loss, "test": test,
               "history": history, "step_history": step_history, "train_img_per_s": 123.4, "steps": 120,
               "wall_s": 56.0, "bad_steps": 0}
    (run / "metrics.json").write_text(json.dumps(metrics))
    probs = np.full((n, K), 0.05)
    probs[np.arange(n), p] = 0.8
    with (run / "predictions_test.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["source_id", "label", "pred", *(f"prob_{k}" for k in range(K))])
        for i in range(n):
            w.writerow([f"img_{i:04d}", y[i], p[i], *probs[i]])
    (run / "config.yaml").write_text(f"run:\n  name: {name}\n")
    return run


def parse_table(md: str, heading_start: str) -> list[list[str]]:
    """Cells of the first Markdown table after the heading that starts with ``heading_start`` (header included,
    alignment row dropped)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and
                 line.lstrip("#").strip().startswith(heading_start))
    rows, in_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            in_table = True
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if not all(re.fullmatch(r"-+:?", c) for c in line.strip().strip("|").split("|")):
                rows.append(cells)
        elif in_table:
            break
    return rows


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = make_run(root, "baseline", "ce", acc=0.6, seed=1, meta=False)
    b = make_run(root, "meta", "meta", acc=0.7, seed=2, meta=True)
    out = write_report([a, b], n_boot=300, seed=0)
    return a, b, out, out.read_text()


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_default_output_location(two_runs):
    a, _, out, _ = two_runs
    assert out == a / "report.md"
    assert (a / "figures").is_dir()


def test_table_one_equals_run_metrics_with_difference_row(two_runs):
    a, b, _, md = two_runs
    rows = parse_table(md, "Table I")
    assert rows[0] == ["Run", "Loss", "Accuracy", "Macro-F1", "Weighted-F1", "QWK"]
    keys = ["accuracy", "macro_f1", "weighted_f1", "qwk"]
    ma, mb = _metrics(a)["test"], _metrics(b)["test"]
    assert rows[1] == ["A: baseline", "ce", *(f"{ma[k]:.4f}" for k in keys)]
    assert rows[2] == ["B: meta", "meta", *(f"{mb[k]:.4f}" for k in keys)]
    assert rows[3] == ["B − A", "", *(f"{mb[k] - ma[k]:+.4f}" for k in keys)]
    assert len(rows) == 4
    assert table_one_markdown([a, b]) in md  # what the CLI prints is what the report holds


def test_table_two_equals_per_class_recall(two_runs):
    a, b, _, md = two_runs
    rows = parse_table(md, "Table II")
    assert rows[0] == ["Class", "Support", "Recall A: baseline", "Recall B: meta", "B − A"]
    ma, mb = _metrics(a)["test"], _metrics(b)["test"]
    assert [r[0] for r in rows[1:]] == NAMES
    for c, row in enumerate(rows[1:]):
        ra, rb = ma["per_class_recall"][c], mb["per_class_recall"][c]
        assert row[1:] == [str(ma["support"][c]), f"{ra:.4f}", f"{rb:.4f}", f"{rb - ra:+.4f}"]


def test_ci_table_brackets_point_estimates_and_matches_bootstrap_ci(two_runs):
    a, b, _, md = two_runs
    rows = parse_table(md, "95% bootstrap")
    assert rows[0] == ["Metric", "A: baseline", "B: meta"]
    assert [r[0] for r in rows[1:]] == ["Accuracy", "Macro-F1", *(f"Recall {n}" for n in NAMES)]
    for col, run in ((1, a), (2, b)):
        test = _metrics(run)["test"]
        points = [test["accuracy"], test["macro_f1"], *test["per_class_recall"]]
        for row, point in zip(rows[1:], points):
            m = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", row[col])
            p, lo, hi = map(float, m.groups())
            assert m.group(1) == f"{point:.4f}"
            assert lo <= p <= hi and hi - lo > 0
        r = load_run(run)
        acc = bootstrap_ci(r.y_true, r.y_pred, lambda t, q: float(np.mean(t == q)), 300, 0)
        assert rows[1][col] == f"{acc[0]:.4f} [{acc[1]:.4f}, {acc[2]:.4f}]"


def test_figures_are_real_pngs(two_runs):
    a, _, out, md = two_runs
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    stems = {Path(link).stem for link in links}
    assert {"meta_weights", "val_accuracy", "meta_loss", "class_recall", "confusion_A_baseline",
            "confusion_B_meta"} == stems
    for link in links:
        path = out.parent / link
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, link
        assert len(data) > 5_000, link
        with Image.open(path) as img:
            img.load()
            assert img.width > 200 and img.height > 200, link


def test_runs_without_meta_weights_are_skipped_with_a_note(two_runs):
    _, _, _, md = two_runs
    assert "A: baseline has no meta weights" in md


def test_figure_c_plots_the_same_quantity_for_every_run(two_runs):
    # the meta run also logged a per-step meta-*batch* loss (1.8/step): not comparable with a split evaluation,
    # so both runs show their meta-split loss per epoch, from their history
    a, b, _, _ = two_runs
    from trainer.reporting.figures import validation_loss_series
    from trainer.reporting.report import _as_runs

    series, notes = validation_loss_series(_as_runs([a, b]))
    for run, label in ((a, "A: baseline"), (b, "B: meta")):
        hist = _metrics(run)["history"]
        assert series[label] == ([h["epoch"] for h in hist], [h["val"]["loss"] for h in hist])
    assert notes == []


def test_runs_on_different_test_sets_warn_and_give_no_difference(tmp_path):
    a = make_run(tmp_path, "a", "ce", acc=0.6, seed=1, meta=False, n=300)
    b = make_run(tmp_path, "b", "meta", acc=0.7, seed=2, meta=True, n=280)  # another split: 280 test images
    md = write_report([a, b], tmp_path / "r.md", n_boot=50).read_text()
    assert "**Warning:** the runs were evaluated on different test sets (A: a n=300, B: b n=280)" in md
    assert "| B − A |" not in md and not parse_table(md, "Table II")[0][-1].startswith("B − A")
    assert [row[0] for row in parse_table(md, "Table I")[1:]] == ["A: a", "B: b"]
    proc = run_cli("-m", "launch.cli", "report", str(a), str(b), "--out", str(tmp_path / "r2.md"), "--n-boot",
                   "20")
    assert "metaloss: warning: the runs were evaluated on different test sets" in proc.stderr
    assert "B − A" not in proc.stdout


def test_single_baseline_run_report(tmp_path):
    a = make_run(tmp_path, "only", "focal", acc=0.5, seed=3, meta=False, n=120)
    out = write_report([a], tmp_path / "out" / "r.md", n_boot=50)
    md = out.read_text()
    assert "B − A" not in md
    assert not (tmp_path / "out" / "figures" / "meta_weights.png").exists()
    assert "No run has data for this figure." in md
    assert (tmp_path / "out" / "figures" / "meta_loss.png").is_file()  # falls back to val loss per epoch
    assert len(parse_table(md, "Table I")) == 2


def test_three_runs_have_no_difference_row_and_per_run_support(tmp_path):
    # n differs per run, so the test sets differ
    runs = [make_run(tmp_path, f"r{i}", "ce", acc=0.6, seed=10 + i, meta=False, n=100 + i) for i in range(3)]
    t1 = table_one_markdown(runs).splitlines()
    assert len(t1) == 2 + 3 and "B − A" not in "\n".join(t1)
    header = table_two_markdown(runs).splitlines()[0]
    # the three test sets differ, so one support column per run instead of a shared one
    assert "Support A: r0" in header and "Support C: r2" in header and "B − A" not in header


# ------------------------------------------------------------------------------------------------- bootstrap


def _accuracy(t, p):
    return float(np.mean(t == p))


def _exact_accuracy_preds(n: int, acc: float) -> tuple[np.ndarray, np.ndarray]:
    y = np.arange(n) % K
    p = y.copy()
    wrong = np.arange(n) % 10 >= round(acc * 10)  # exactly acc correct
    p[wrong] = (y[wrong] + 1) % K
    return y, p


def test_bootstrap_ci_contains_point_and_narrows_with_more_samples():
    small = bootstrap_ci(*_exact_accuracy_preds(200, 0.7), _accuracy, n_boot=1000, seed=0)
    large = bootstrap_ci(*_exact_accuracy_preds(5000, 0.7), _accuracy, n_boot=1000, seed=0)
    for point, lo, hi in (small, large):
        assert point == pytest.approx(0.7, abs=1e-12)
        assert lo < point < hi
    # the width scales as 1/sqrt(n): 25x the samples -> ~5x narrower
    assert (large[2] - large[1]) < (small[2] - small[1]) / 3


def test_bootstrap_width_matches_binomial_oracle():
    n, acc = 5000, 0.7
    _, lo, hi = bootstrap_ci(*_exact_accuracy_preds(n, acc), _accuracy, n_boot=2000, seed=1)
    expected = 2 * 1.959964 * np.sqrt(acc * (1 - acc) / n)  # normal approximation of the percentile interval
    assert (hi - lo) == pytest.approx(expected, rel=0.15)


def test_bootstrap_is_seeded_and_report_cis_use_the_same_resamples():
    y, p = _labels_preds(400, 0.65, seed=5)
    first = bootstrap_ci(y, p, _accuracy, n_boot=200, seed=7)
    assert bootstrap_ci(y, p, _accuracy, n_boot=200, seed=7) == first
    assert bootstrap_ci(y, p, _accuracy, n_boot=200, seed=8) != first
    cis = bootstrap_report_cis(y, p, K, n_boot=200, seed=7)
    assert cis["accuracy"] == pytest.approx(first, abs=1e-12)
    recall3 = bootstrap_ci(y, p, lambda t, q: compute_metrics(t, q, K)["per_class_recall"][3], 200, 7)
    assert cis["per_class_recall"][3] == pytest.approx(recall3, abs=1e-12)
    macro = bootstrap_ci(y, p, lambda t, q: compute_metrics(t, q, K)["macro_f1"], 200, 7)
    assert cis["macro_f1"] == pytest.approx(macro, abs=1e-12)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="equal-length"):
        bootstrap_ci([0, 1], [0], _accuracy, 10, 0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([0, 1], [0, 1], _accuracy, 0, 0)


# ------------------------------------------------------------------------------------------------- bad run dirs


def test_missing_metrics_json_names_the_path(tmp_path):
    run = make_run(tmp_path, "r", "ce", acc=0.6, seed=1, meta=False, n=50)
    (run / "metrics.json").unlink()
    with pytest.raises(ReportInputError, match=re.escape(str(run / "metrics.json")) + ".*not found"):
        write_report([run])


def test_missing_keys_are_all_named(tmp_path):
    run = make_run(tmp_path, "r", "ce", acc=0.6, seed=1, meta=False, n=50)
    data = _metrics(run)
    del data["test"]["qwk"]
    del data["history"][1]["val"]["per_class_recall"]
    data["test"]["support"] = data["test"]["support"][:3]
    (run / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(ReportInputError) as err:
        load_run(run)
    msg = str(err.value)
    assert str(run / "metrics.json") in msg
    assert "'test.qwk'" in msg and "'history[1].val.per_class_recall'" in msg and "'test.support'" in msg


def test_missing_top_level_key_and_bad_json(tmp_path):
    run = make_run(tmp_path, "r", "ce", acc=0.6, seed=1, meta=False, n=50)
    data = _metrics(run)
    del data["step_history"]
    (run / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(ReportInputError, match="missing key 'step_history'"):
        load_run(run)
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(ReportInputError, match="not valid JSON"):
        load_run(run)


def test_bad_prediction_rows_are_named_by_line(tmp_path):
    run = make_run(tmp_path, "r", "ce", acc=0.6, seed=1, meta=False, n=50)
    path = run / "predictions_test.csv"
    lines = path.read_text().splitlines()
    lines[3] = "img_x,7,0,0.2,0.2,0.2,0.2,0.2"   # label out of range (file line 4)
    lines[6] = "img_y,1,zero,0.2,0.2,0.2,0.2,0.2"  # not an integer (file line 7)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportInputError) as err:
        load_run(run)
    msg = str(err.value)
    assert str(path) in msg and "line 4" in msg and "line 7" in msg


def test_wrong_header_and_missing_predictions(tmp_path):
    run = make_run(tmp_path, "r", "ce", acc=0.6, seed=1, meta=False, n=50)
    path = run / "predictions_test.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["id,label,pred"] + lines[1:]) + "\n")
    with pytest.raises(ReportInputError, match="header must be source_id,label,pred,prob_0"):
        load_run(run)
    path.unlink()
    with pytest.raises(ReportInputError, match=re.escape(str(path)) + ": not found"):
        load_run(run)


def test_predictions_that_disagree_with_metrics_are_refused(tmp_path):
    run = make_run(tmp_path, "r", "ce", acc=0.6, seed=1, meta=False, n=50)
    path = run / "predictions_test.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # one test image lost
    with pytest.raises(ReportInputError, match="different evaluations"):
        load_run(run)


def test_runs_with_different_classes_are_not_compared(tmp_path):
    a = make_run(tmp_path, "a", "ce", acc=0.6, seed=1, meta=False, n=50)
    b = make_run(tmp_path, "b", "ce", acc=0.6, seed=2, meta=False, n=50)
    data = _metrics(b)
    data["class_names"] = [f"class_{k}" for k in range(K)]
    (b / "metrics.json").write_text(json.dumps(data))
    with pytest.raises(ReportInputError, match="not comparable"):
        table_one_markdown([a, b])
