"""launch/slurm/train.sbatch, run by bash with stand-ins for srun and scontrol: it requeues exactly when the
training left checkpoints/PREEMPTED (a SIGTERM-checkpointed exit, at pre-emption or at the time limit), never for a
finished or a failed attempt, and it pins gloo/NCCL to SOCKET_IFNAME on multi-homed nodes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# srun stand-in: records the environment the job step gets, then does what the test asks of the training
FAKE_SRUN = """#!/bin/bash
echo "GLOO=${GLOO_SOCKET_IFNAME:-} NCCL=${NCCL_SOCKET_IFNAME:-}" >> "$FAKE_LOG"
echo "srun $*" >> "$FAKE_LOG"
if [ "${FAKE_EXEC:-0}" = 1 ]; then shift; "$@" || exit $?; fi
if [ "${FAKE_PREEMPT:-0}" = 1 ]; then mkdir -p "$FAKE_RUN_DIR/checkpoints" && echo '{}' > "$FAKE_RUN_DIR/checkpoints/PREEMPTED"; fi
exit "${FAKE_RC:-0}"
"""
# accelerate stand-in (FAKE_EXEC=1 runs the step's command): one argument a line, as the launcher received them
FAKE_ACCELERATE = """#!/bin/bash
printf 'arg:%s\\n' "$@" >> "$FAKE_LOG"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo node1; echo node2; else echo "scontrol $*" >> "$FAKE_LOG"; fi
"""


def _run(tmp_path, *, preempt=False, rc=0, stale_marker=False, env=None, name="job", extra=()):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / tool).write_text(text)
        (bin_dir / tool).chmod(0o755)
    run_dir = tmp_path / "runs" / name
    if stale_marker:
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "PREEMPTED").write_text("{}")
    log = tmp_path / "log.txt"
    log.write_text("")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
                "PYTHONPATH": str(REPO), "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
                "SLURM_JOB_ID": "4242", "SLURM_NODEID": "0", "FAKE_LOG": str(log), "FAKE_RUN_DIR": str(run_dir),
                "FAKE_PREEMPT": str(int(preempt)), "FAKE_RC": str(rc), **(env or {})}
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "SOCKET_IFNAME"):
        if key not in (env or {}):
            full_env.pop(key, None)
    proc = subprocess.run(["bash", "launch/slurm/train.sbatch", "configs/demo.yaml",
                           f"run.out_dir={tmp_path / 'runs'}", f"run.name={name}", *extra], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60)
    return proc, log.read_text()


@pytest.mark.parametrize("launcher_rc", [0, 1])  # the launcher re-raises the SIGTERM it got: non-zero is normal
def test_a_preempted_attempt_is_requeued_even_at_the_time_limit(tmp_path, launcher_rc):
    proc, log = _run(tmp_path, preempt=True, rc=launcher_rc)
    assert proc.returncode == 0, proc.stderr
    assert "scontrol requeue 4242" in log
    assert "--resume auto" in log and "--main_process_ip node1" in log


def test_a_finished_or_failed_attempt_is_not_requeued(tmp_path):
    proc, log = _run(tmp_path)
    assert proc.returncode == 0 and "requeue" not in log
    # a marker left by an earlier attempt does not requeue an attempt that failed before training
    proc, log = _run(tmp_path, rc=3, stale_marker=True)
    assert proc.returncode == 3 and "requeue" not in log


def test_socket_ifname_pins_gloo_and_nccl(tmp_path):
    _, log = _run(tmp_path, env={"SOCKET_IFNAME": "ib0"})
    assert "GLOO=ib0 NCCL=ib0" in log
    _, log = _run(tmp_path)
    assert "GLOO= NCCL=" in log  # unset: the libraries choose, as before


def test_the_job_asks_for_the_signal_before_the_time_limit_and_may_be_requeued():
    directives = {line.split()[1] for line in (REPO / "launch/slurm/train.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH ")}
    # TERM to the job step's processes (not only the batch shell: no "B:") 120 s before the limit
    assert {"--signal=TERM@120", "--requeue", "--open-mode=append"} <= directives


def test_an_override_with_a_space_reaches_the_trainer_as_one_argument(tmp_path):
    # the step's command is re-parsed by `bash -c`: unquoted, "run.name=my job" became two arguments there
    proc, log = _run(tmp_path, preempt=True, env={"FAKE_EXEC": "1"}, name="my job")
    assert proc.returncode == 0, proc.stderr
    args = [line[4:] for line in log.splitlines() if line.startswith("arg:")]
    assert args[args.index("launch.train") + 1:] == ["configs/demo.yaml", f"run.out_dir={tmp_path / 'runs'}",
                                                      "run.name=my job", "--resume", "auto"]
    assert "scontrol requeue 4242" in log  # the marker under the spaced run dir was found


def test_a_config_error_is_one_line_and_exit_2_before_the_job_step(tmp_path):
    proc, log = _run(tmp_path, extra=("optim.lr=fast",))
    assert proc.returncode == 2 and "srun" not in log
    assert proc.stderr.strip().splitlines() == [
        "metaloss: error: override 'optim.lr=fast': config key 'optim.lr': expected a number, got 'fast'"]
