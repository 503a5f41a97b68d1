"""Build the Accelerator: device, precision, process group backend, DDP or DeepSpeed ZeRO-1/2."""
from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from .config import Config, ConfigError

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _use_cpu(cfg: Config) -> bool:
    return cfg.train.cpu or not torch.cuda.is_available()


def _deepspeed_plugin(cfg: Config):
    from accelerate.utils import DeepSpeedPlugin

    path = Path(cfg.train.deepspeed_config or "configs/deepspeed/zero2.json")
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: file not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {e}") from None
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        # ZeRO-3 partitions the parameters across ranks; the look-ahead needs every parameter whole on every rank.
        raise ConfigError(f"train.deepspeed_config: {path} asks for ZeRO stage {stage}; metaloss supports ZeRO-1/2 "
                          "only (the meta step's look-ahead needs the full parameters on each rank)")
    # batch sizes and precision come from our config, so one JSON serves every run
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds.pop("train_batch_size", None)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("gradient_clipping", cfg.train.grad_clip or 0.0)
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16"}
    return DeepSpeedPlugin(hf_ds_config=ds)


def build_accelerator(cfg: Config) -> Accelerator:
    cpu = _use_cpu(cfg)
    if cfg.train.precision == "fp16" and cpu:
        raise ConfigError("train.precision: fp16 needs a GPU (use bf16 or fp32 on CPU)")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.train.distributed == "deepspeed":
        # gloo on CPU (nccl needs GPUs); a generous timeout so a slow first-epoch DALI warm-up does not kill ranks.
        # Only under a launcher: with a backend set but no launcher env, Accelerate asks for a group nobody made.
        handlers.append(InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=timedelta(minutes=30)))
    kwargs = dict(mixed_precision=_PRECISION[cfg.train.precision], kwargs_handlers=handlers,
                  step_scheduler_with_optimizer=False)
    if cfg.train.distributed == "deepspeed":
        # Accelerator(cpu=True, deepspeed_plugin=...) silently drops DeepSpeed: leave cpu=False; without CUDA
        # accelerate picks the CPU anyway, and the gloo backend above makes the process group work there.
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
        return Accelerator(deepspeed_plugin=_deepspeed_plugin(cfg), **kwargs)
    return Accelerator(cpu=cpu, **kwargs)
