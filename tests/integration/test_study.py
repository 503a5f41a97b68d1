"""`metaloss study`: a 2 x 2 CPU study killed in the middle (SIGTERM to the study process) and resumed; the study
file's checks; the failed-run record; the emitted SLURM array scripts."""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.cli import REPO, run_cli
from launch.study.slurm import emit_slurm
from launch.study.spec import StudyError, load_study


def _study_file(tmp_path: Path, data_dir: Path, **changes) -> Path:
    spec = {
        "name": "t", "base": str(REPO / "configs/demo.yaml"), "out": str(tmp_path / "study"),
        "set": {"data.root": str(data_dir), "data.format": "aptos", "data.image_size": 32, "data.num_workers": 0,
                "model.arch": "tiny", "train.epochs": 2, "train.batch_size": 8, "train.eval_batch_size": 16,
                "logging.every_steps": 2, "logging.log_images": False, "checkpoint.keep_last": 1,
                "checkpoint.every_steps": 2},
        "grid": {"train.loss": ["ce", "focal"], "train_fraction": [0.5, 1.0]},
        "seeds": [0, 1], "world_sizes": [1], "split_seed": 3, "metric": "macro_f1",
    }
    spec.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _status(out: Path) -> dict:
    try:
        return json.loads((out / "study" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _ids(path: Path, split: str | None = None) -> list[str]:
    with open(path) as f:
        return sorted(r["source_id"] for r in csv.DictReader(f) if split is None or r["split"] == split)


@pytest.mark.slow
def test_study_killed_in_the_middle_resumes_without_repeating_finished_runs(synth_dir, tmp_path):
    # one seed: every run is a process start (most of this test's time); tests/unit/test_comparison_report.py and
    # the compare study cover the statistics over seeds
    path = _study_file(tmp_path, synth_dir, seeds=[0])
    study = load_study(path)
    out = study.out
    names = [r.name for r in study.runs]
    assert len(names) == 4
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "study", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait until the third run is mid-training with a checkpoint on disk, then stop the study as a scheduler would
    victim = out / "runs" / names[2]
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if list((victim / "checkpoints").glob("step_*/COMPLETE")) and not (victim / "metrics.json").exists():
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    log_text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log_text
    first = _status(out)
    assert [first[n]["status"] for n in names[:2]] == ["done", "done"], first
    assert first[names[2]]["status"] == "interrupted" and not (victim / "metrics.json").exists()
    assert all(n not in first for n in names[3:])
    stamps = {n: (out / "runs" / n / "metrics.json").stat().st_mtime_ns for n in names[:2]}

    run_cli("-m", "launch.cli", "study", str(path), timeout=900)
    final = _status(out)
    assert all(final[n]["status"] == "done" for n in names), final
    # finished runs were not run again; the interrupted one continued from its checkpoint
    assert {n: (out / "runs" / n / "metrics.json").stat().st_mtime_ns for n in names[:2]} == stamps
    assert [final[n]["attempts"] for n in names] == [1, 1, 2, 1]
    second_attempt = (out / "study" / "logs" / f"{names[2]}.log").read_text().split("\n=== ")[-1]
    assert "resumed from" in second_attempt

    # one test set for every cell and seed (data.split_seed), train subsets nested across fractions
    test_ids = {n: _ids(out / "runs" / n / "predictions_test.csv") for n in names}
    assert len({tuple(v) for v in test_ids.values()}) == 1
    half = _ids(out / "runs" / "loss-ce_train_fraction-0.5_ws1__seed0" / "splits.csv", "train")
    full = _ids(out / "runs" / "loss-ce_train_fraction-1.0_ws1__seed0" / "splits.csv", "train")
    assert set(half) < set(full) and len(half) == pytest.approx(len(full) / 2, abs=3)

    with open(out / "study" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names
    assert {(r["train.loss"], r["data.train_fraction"], r["seed"]) for r in rows} == {
        (loss, frac, "0") for loss in ("ce", "focal") for frac in ("0.5", "1.0")}
    for r, n in zip(rows, names):
        m = json.loads((out / "runs" / n / "metrics.json").read_text())
        assert float(r["macro_f1"]) == pytest.approx(m["test"]["macro_f1"])
        assert int(r["steps"]) == m["steps"] and float(r["img_per_s"]) > 0 and float(r["wall_s"]) > 0
    report = (out / "study" / "report.md").read_text()
    assert "Paired comparison against `ce`" in report and "| focal | 0.5 | 1 | 1 |" in report
    assert (out / "study" / "figures" / "macro_f1_vs_train_fraction.png").is_file()
    assert (out / "study" / "figures" / "throughput_vs_world_size.png").is_file()
    # --collect rebuilds the summary from the run dirs alone and does not log a second hparams session
    (out / "study" / "results.csv").unlink()
    run_cli("-m", "launch.cli", "study", str(path), "--collect", timeout=300)
    with open(out / "study" / "results.csv") as f:
        assert [r["macro_f1"] for r in csv.DictReader(f)] == [r["macro_f1"] for r in rows]
    _check_hparams(out / "runs" / names[0] / "tb", {"train.loss": "ce", "data.train_fraction": 0.5})


def _check_hparams(tb: Path, expected: dict) -> None:
    """Read every event file of the run's tb dir: exactly one hparams session, holding the run's grid values."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    starts = []
    for events in sorted(tb.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    starts.append(data.session_start_info)
    assert len(starts) == 1, f"{len(starts)} hparams sessions in {tb}, expected 1"
    hp = starts[0].hparams
    assert hp["train.loss"].string_value == expected["train.loss"]
    assert hp["data.train_fraction"].number_value == expected["data.train_fraction"]


@pytest.mark.slow
def test_failed_run_is_recorded_and_the_study_goes_on(synth_dir, tmp_path):
    # batch 1000 > the train split: the training refuses it at start-up (a run-time failure, not a config error)
    path = _study_file(tmp_path, synth_dir, grid={"train.loss": ["ce"]}, seeds=[0])
    spec = yaml.safe_load(path.read_text())
    spec["set"]["train.batch_size"] = 1000
    path.write_text(yaml.safe_dump(spec))
    proc = run_cli("-m", "launch.cli", "study", str(path), check=False, timeout=300)
    assert proc.returncode == 1, proc.stderr
    status = _status(tmp_path / "study")
    (entry,) = status.values()
    assert entry["status"] == "failed" and "lower train.batch_size" in entry["error"]
    with open(tmp_path / "study" / "study" / "results.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "failed" and "lower train.batch_size" in row["error"]
    assert "## Failed runs" in (tmp_path / "study" / "study" / "report.md").read_text()
    # a re-run keeps it failed instead of repeating it (unless --retry-failed)
    again = run_cli("-m", "launch.cli", "study", str(path), check=False, timeout=300)
    assert again.returncode == 1 and _status(tmp_path / "study") == status


@pytest.mark.parametrize("change,needle", [
    ({"grid": {"train.nope": [1, 2]}}, "train.nope"),
    ({"grid": {"train.seed": [1, 2]}}, "set by the study itself"),
    ({"seeds": []}, "'seeds'"),
    ({"metric": "f2"}, "'metric'"),
    ({"colour": 1}, "unknown key"),
    ({"grid": {"train.loss": ["ce", "nope"]}}, "train.loss"),
])
def test_bad_study_file_names_the_key(synth_dir, tmp_path, change, needle):
    with pytest.raises(StudyError, match=needle):
        load_study(_study_file(tmp_path, synth_dir, **change))


def test_bad_study_file_is_one_line_through_the_cli(synth_dir, tmp_path):
    proc = run_cli("-m", "launch.cli", "study", str(_study_file(tmp_path, synth_dir, seeds="x")), check=False)
    assert proc.returncode == 2 and "'seeds'" in proc.stderr and "Traceback" not in proc.stderr


def test_emitted_slurm_array_scripts(synth_dir, tmp_path):
    study = load_study(_study_file(tmp_path, synth_dir, world_sizes=[1, 16]))
    scripts = emit_slurm(study, tmp_path / "slurm")
    assert [s.name for s in scripts] == ["t_ws1.sbatch", "t_ws16.sbatch"]
    text = scripts[1].read_text()
    for line in ("#SBATCH --array=0-7", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
                 "#SBATCH --signal=TERM@120", "#SBATCH --cpus-per-task=64", "#SBATCH --job-name=t-ws16"):
        assert line in text.splitlines(), line
    assert "--num_processes 16" in text and '-m launch.train "$@" --resume auto --quiet' in text
    assert 'if [ -f "$RUN_DIR/metrics.json" ]' in text
    assert "#SBATCH --nodes=1" in scripts[0].read_text() and "#SBATCH --gpus-per-node=1" in scripts[0].read_text()
    subprocess.run(["bash", "-n", str(scripts[1])], check=True)  # valid bash
    lines = (tmp_path / "slurm" / "t_ws16.runs").read_text().splitlines()
    runs16 = [r for r in study.runs if r.world_size == 16]
    assert len(lines) == 8
    for line, run in zip(lines, runs16):
        args = shlex.split(line)
        assert args[0] == str(study.runs_dir / run.name) and args[1] == str(study.base)
        assert f"run.name={run.name}" in args and f"train.seed={run.seed}" in args and "data.split_seed=3" in args


@pytest.mark.slow
def test_jobs_run_concurrently_each_on_its_share_of_the_cores(synth_dir, tmp_path):
    """`--jobs 2`: two real trainings at once, each told to use half the cores (two runs each spinning one thread per
    core would oversubscribe the node), with one status record per run."""
    path = _study_file(tmp_path, synth_dir, grid={"train.loss": ["ce", "focal"]}, seeds=[0])
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the conftest pins it for the suite
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "study", str(path), "--jobs", "2", "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = load_study(path).out
    status = _status(out)
    assert len(status) == 2 and all(s["status"] == "done" and s["attempts"] == 1 for s in status.values()), status
    # both were running at the same time: each started before the other finished
    assert max(s["started_at"] for s in status.values()) < min(s["finished_at"] for s in status.values()), status
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for name, s in status.items():
        assert s["slot_env"] == {"OMP_NUM_THREADS": str(threads)}
        hardware = json.loads((out / "runs" / name / "metrics.json").read_text())["hardware"]
        assert f", {threads} threads)" in hardware, hardware  # torch's own default here is one per core
