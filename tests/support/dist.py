"""Shared by the 2-process tests and the scripts they launch: free ports, the torchrun command line, the small
float64 meta problem, and comparisons of final run artefacts."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tests" / "distributed" / "dist_scripts"
LOOKAHEAD_LR = 0.5  # large on purpose: the meta-gradient is then far from zero in every coordinate
# wall-clock and throughput fields: the only parts of metrics.json allowed to differ between identical runs
TIMING_KEYS = ("train_img_per_s", "wall_s")


def free_port() -> int:
    """A port nobody listens on right now (bound to 0 and released): concurrent test runs never collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           # CPU-only even on a GPU machine: the tests pin gloo and compare CPU results bit for bit
           "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("METALOSS_TEST_FAULT", None)
    env.update(extra or {})
    return env


def torchrun(*args: str, nproc: int = 2, env: dict | None = None, timeout: int = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N --master_port <free> args...`` on the CPU; returns the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=subprocess_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def accelerate_launch(*args: str, config: str = "launch/accelerate/cpu_2proc.yaml", env: dict | None = None,
                      timeout: int = 300) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file CONFIG --main_process_port <free> args...`` (the user-facing launcher)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           "--main_process_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=subprocess_env(env))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def python(*args: str, env: dict | None = None, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """One plain process (``python args...``) with the same environment as ``torchrun``."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


# --------------------------------------------------------------------------------------------- run artefacts
def final_checkpoint(run_dir: Path) -> Path:
    from trainer.engine.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    assert ckpts, f"no complete checkpoint in {run_dir}"
    return ckpts[0]


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Model weights, optimiser state and (for meta runs) φ + its Adam state of a DDP/1-process checkpoint."""
    out = {f"model.{k}": v for k, v in torch.load(ckpt / "pytorch_model.bin", weights_only=True).items()}
    opt = torch.load(ckpt / "optimizer.bin", weights_only=False)
    for pid, st in opt["state"].items():
        for k, v in st.items():
            out[f"optim.{pid}.{k}"] = v
    for f in sorted(ckpt.glob("custom_checkpoint_*.pkl")):
        state = torch.load(f, weights_only=False)
        if isinstance(state, dict) and "meta_net" in state:
            out.update({f"phi.{k}": v for k, v in state["meta_net"].items()})
            for pid, st in state["optimizer"]["state"].items():
                out.update({f"phi_adam.{pid}.{k}": v for k, v in st.items()})
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"not bit-identical: {differ[:8]}"


def comparable_metrics(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    for k in TIMING_KEYS:
        m.pop(k)
    m.pop("run")
    return m


# --------------------------------------------------------------------------------------------- float64 meta problem
def meta_config(data_dir: Path):
    from trainer.config import config_from_dict

    return config_from_dict({
        "data": {"root": str(data_dir), "format": "aptos", "backend": "torch", "image_size": 16, "num_workers": 0},
        "model": {"arch": "tiny", "channels_last": False},
        "meta": {"granularity": "class", "lookahead": "exact", "lookahead_optimizer": "sgd"},
        "train": {"loss": "meta", "batch_size": 8, "cpu": True, "seed": 0},
    })


def meta_problem(data_dir: Path, rank: int, world: int):
    """(cfg, float64 TinyCNN in train mode, this rank's streams): identical on every rank but for the shards."""
    from data_pipeline.dataset import load_records
    from data_pipeline.factory import build_streams
    from data_pipeline.settings import DataSettings
    from data_pipeline.splits import make_splits
    from trainer.components.models import build_model

    cfg = meta_config(data_dir)
    data = DataSettings.from_config(cfg)
    splits = make_splits(load_records(data), cfg.data.split_fractions, cfg.train.seed, cfg.model.num_classes)
    streams = build_streams(data, splits, rank, world)
    streams.train.set_epoch(0)
    torch.manual_seed(0)
    model = build_model(cfg.model).double().train()
    return cfg, model, streams
