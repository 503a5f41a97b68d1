"""``--emit-slurm DIR``: one sbatch array script per world size, one run per array task.

The #SBATCH settings come from launch/slurm/train.sbatch (signal, requeue, cpus, ...); only the job name, the array,
the output pattern and the node/GPU counts (from the world size, 8 GPUs a node) are replaced. Every task runs the
same `accelerate launch ... -m launch.train ... --resume auto` line as train.sbatch, so pre-emption and requeue
behave the same; a task whose run dir already has metrics.json exits at once (re-submitting never repeats work).
After the array: `metaloss study STUDY.yaml --collect` writes results.csv and report.md.
"""
from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

from common.atomic import atomic_write_text
from launch.study.spec import Study

TRAIN_SBATCH = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
GPUS_PER_NODE = 8
_REPLACED = ("job-name", "nodes", "gpus-per-node", "output", "array")


def sbatch_settings(path: Path = TRAIN_SBATCH) -> list[tuple[str, str]]:
    """(option, value) of every `#SBATCH --option=value` line, in file order."""
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:[=\s]+(.*))?$", line.strip())
        if m:
            out.append((m.group(1), (m.group(2) or "").strip()))
    return out


def array_script(study: Study, world_size: int, runs_file: Path, n_tasks: int) -> str:
    nodes = math.ceil(world_size / GPUS_PER_NODE)
    gpus = min(world_size, GPUS_PER_NODE)
    kept = [(k, v) for k, v in sbatch_settings() if k not in _REPLACED]
    settings = [("job-name", f"{study.name}-ws{world_size}"), ("array", f"0-{n_tasks - 1}"), ("nodes", str(nodes)),
                ("gpus-per-node", str(gpus)), *kept, ("output", f"slurm-{study.name}-%A_%a.out")]
    header = "\n".join(f"#SBATCH --{k}={v}" if v else f"#SBATCH --{k}" for k, v in settings)
    return f"""#!/bin/bash
# Study {study.name}: {n_tasks} run(s) at world size {world_size}, one per array task (made by `metaloss study
# {study.path} --emit-slurm`). Submit from the repository root: sbatch {runs_file.parent}/{study.name}_ws{world_size}.sbatch
# Then: metaloss study {study.path} --out {study.out} --collect
{header}
set -euo pipefail
LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(runs_file))})
eval "set -- $LINE"
RUN_DIR=$1; shift
if [ -f "$RUN_DIR/metrics.json" ]; then echo "finished before: $RUN_DIR"; exit 0; fi
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${{MASTER_PORT:-$((29500 + SLURM_ARRAY_TASK_ID % 1000))}}
# single quotes: the node's own SLURM_NODEID; "$@" keeps every override one argument (lists, spaces)
srun --kill-on-bad-exit=1 bash -c 'accelerate launch \\
  --config_file launch/accelerate/multinode.yaml \\
  --num_machines "$SLURM_NNODES" --num_processes {world_size} \\
  --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \\
  -m launch.train "$@" --resume auto --quiet' bash "$@"
"""


def emit_slurm(study: Study, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ws in study.world_sizes:
        runs = [r for r in study.runs if r.world_size == ws]
        runs_file = out_dir / f"{study.name}_ws{ws}.runs"
        lines = [" ".join(shlex.quote(a) for a in [str(study.runs_dir / r.name), str(study.base), *study.overrides(r)])
                 for r in runs]
        atomic_write_text(runs_file, "\n".join(lines) + "\n")
        script = out_dir / f"{study.name}_ws{ws}.sbatch"
        atomic_write_text(script, array_script(study, ws, runs_file, len(runs)))
        script.chmod(0o755)
        written.append(script)
    return written
