"""What a run reports outside a terminal and across a resume: one progress line per logging interval in a log
file, TensorBoard points at regular steps that a resume never duplicates, and where the run ran (world size,
global batch, hardware) next to its results."""
import json
import re

import pytest
import yaml

from tests.support.cli import run_cli, tiny_overrides

pytestmark = pytest.mark.slow


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_log_file_gets_a_progress_line_per_logging_interval(synth_dir, tmp_path):
    # stderr is a pipe here, as under SLURM or `make demo > log`: no progress bar, a line per interval instead
    proc = run_cli("-m", "launch.train", "configs/demo.yaml",
                   *tiny_overrides(synth_dir, tmp_path, "lines", "train.max_steps=7", "logging.every_steps=3",
                                   "checkpoint.every_steps=2"))
    lines = [ln for ln in proc.stderr.splitlines() if "img/s" in ln and "ETA" in ln]
    steps = [int(re.search(r"step (\d+)/7", ln).group(1)) for ln in lines]
    assert steps == [3, 6, 7], lines  # every 3 steps and the last one; checkpoints (2, 4, 6) add none
    assert all(re.search(r"epoch \d+/2 \| loss \d+\.\d{4} \| [\d.]+ img/s \| ETA \d\d:\d\d:\d\d", ln)
               for ln in lines), lines
    # a run that completes every epoch: its last line (the final flush, after the last epoch ended) says epoch 2/2
    full = run_cli("-m", "launch.train", "configs/demo.yaml",
                   *tiny_overrides(synth_dir, tmp_path, "full", "logging.every_steps=7", "checkpoint.enabled=false"))
    epochs = [int(m.group(1)) for m in re.finditer(r"epoch (\d+)/2 \| loss", full.stderr)]
    assert epochs and epochs[-1] == 2 and max(epochs) == 2, full.stderr[-2000:]
    quiet = run_cli("-m", "launch.train", "configs/demo.yaml",
                    *tiny_overrides(synth_dir, tmp_path, "quiet", "train.max_steps=3"), "--quiet")
    assert "img/s" not in quiet.stderr


def test_tensorboard_after_a_resume_has_each_step_once_at_regular_steps(synth_dir, tmp_path):
    args = ["-m", "launch.train", "configs/demo.yaml",
            *tiny_overrides(synth_dir, tmp_path, "tbres", "checkpoint.every_steps=3", "checkpoint.keep_last=3",
                            "logging.every_steps=2"), "--quiet"]
    proc = run_cli(*args, env={"METALOSS_TEST_FAULT": "kill_after_step:8"}, check=False)
    assert proc.returncode == -9
    run_dir = tmp_path / "tbres"
    assert [s for s, _ in _scalars(run_dir, "train/loss")] == [2, 4, 6, 8]  # no point at checkpoints 3, 6
    run_cli(*args, "--resume", "auto")  # from the step-6 checkpoint: steps 7 and 8 are trained (and logged) again
    steps = [s for s, _ in _scalars(run_dir, "train/loss")]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # regular, and each once
    m = json.loads((run_dir / "metrics.json").read_text())
    assert _scalars(run_dir, "progress/images_seen")[-1] == (20, 20 * 8.0)
    assert (m["world_size"], m["global_batch"]) == (1, 8) and "CPU" in m["hardware"]
    header = (run_dir / "config.yaml").read_text().splitlines()[0]
    assert header.startswith("# launched with world_size: 1, global_batch: 8, hardware: 1 x CPU")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"] == 8
