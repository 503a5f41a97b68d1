"""Build the Accelerator (device, precision, process group backend, DDP or DeepSpeed ZeRO-1/2), and the cross-rank
plumbing the loop needs besides it: agreeing on when to stop after a SIGTERM, and keeping BatchNorm buffers right
under DeepSpeed (which, unlike DDP, neither casts nor broadcasts them)."""
from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from trainer.config import Config, ConfigError

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
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config: {path} must hold a JSON object")
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage >= 3:
        # ZeRO-3 partitions the parameters across ranks; the look-ahead needs every parameter whole on every rank.
        raise ConfigError(f"train.deepspeed_config: {path} asks for ZeRO stage {stage}; metaloss supports ZeRO-1/2 "
                          "only (the meta step's look-ahead needs the full parameters on each rank)")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            # the optimiser/schedule come from optim.* so DDP and DeepSpeed runs train the same thing
            raise ConfigError(f"train.deepspeed_config: {path} defines '{key}'; remove it -- metaloss builds the "
                              f"{key} from the optim.* config keys")
    # batch sizes and precision come from our config, so one JSON serves every run
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds.pop("train_batch_size", None)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds.setdefault("gradient_clipping", cfg.train.grad_clip or 0.0)
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16"}
    return DeepSpeedPlugin(hf_ds_config=ds)


def check_distributed_config(cfg: Config) -> None:
    """Refuse combinations that cannot work, before any process group or model exists (a clear one-line error)."""
    if cfg.train.distributed != "deepspeed":
        return
    if cfg.train.loss == "meta" and cfg.meta.lookahead_optimizer == "adam":
        raise ConfigError("meta.lookahead_optimizer: adam is not available under DeepSpeed (ZeRO partitions the "
                          "Adam state across ranks, so no rank holds the preconditioner); use sgd or "
                          "train.distributed=ddp")
    if cfg.train.loss == "meta" and cfg.meta.precision == "fp32" and cfg.train.precision != "fp32":
        raise ConfigError("meta.precision: fp32 is not available with train.distributed=deepspeed and "
                          f"train.precision={cfg.train.precision} (DeepSpeed holds low-precision parameters); use "
                          "meta.precision=same or train.distributed=ddp")
    if cfg.train.loss == "meta" and cfg.train.precision == "fp16":
        # DeepSpeed keeps its own loss scale inside the engine; the virtual step needs a GradScaler to borrow
        raise ConfigError("train.precision: fp16 with train.distributed=deepspeed and train.loss=meta is not "
                          "supported (the look-ahead needs Accelerate's GradScaler); use bf16 or "
                          "train.distributed=ddp")


def build_accelerator(cfg: Config) -> Accelerator:
    check_distributed_config(cfg)
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
        plugin = _deepspeed_plugin(cfg)  # validates the JSON (ZeRO-3 refused) before anything is set up
        if cfg.train.cpu and torch.cuda.is_available():
            raise ConfigError("train.cpu=true with train.distributed=deepspeed on a CUDA machine: DeepSpeed would "
                              "still use the GPUs; hide them (CUDA_VISIBLE_DEVICES=) or use train.distributed=ddp")
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
        acc = Accelerator(deepspeed_plugin=plugin, **kwargs)
        if acc.distributed_type.value != "DEEPSPEED":  # the silent drop above, should Accelerate change its rules
            raise ConfigError("train.distributed=deepspeed: Accelerate did not enable DeepSpeed "
                              f"(got {acc.distributed_type.value})")
        return acc
    return Accelerator(cpu=cpu, **kwargs)


def run_environment(cfg: Config, acc: Accelerator) -> dict:
    """World size, global batch and hardware: recorded with the results (metrics.json, config.yaml), because the
    same config means a different run on 1 CPU and on 8 GPUs."""
    if acc.device.type == "cuda":
        hardware = f"{acc.num_processes} x {torch.cuda.get_device_name(acc.device)}"
    else:
        import platform

        # the thread count too: concurrent study runs (`metaloss study --jobs`) share the cores between them
        hardware = (f"{acc.num_processes} x CPU process ({platform.machine() or 'unknown'}, {os.cpu_count()} cores, "
                    f"{torch.get_num_threads()} threads)")
    return {"world_size": acc.num_processes, "global_batch": cfg.train.batch_size * acc.num_processes,
            "hardware": hardware}


def bare_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The network under DDP / DeepSpeed / torch.compile wrappers.

    ``keep_torch_compile=False`` matters: with the default, Accelerate re-points a compiled wrapper's ``_orig_mod``
    at the bare network it unwrapped -- a compiled DDP model would then silently run without DDP (no gradient
    all-reduce) from that call on."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def match_buffer_dtypes(module: torch.nn.Module) -> None:
    """Give floating buffers (BatchNorm running stats) the dtype of their module's parameters.

    DeepSpeed bf16/fp16 casts the parameters but not the buffers, and BatchNorm on the CPU refuses bf16 weights with
    fp32 running statistics ("expected scalar type BFloat16 but found Float"). Under DDP nothing is cast (autocast
    does the mixed precision) and this changes nothing.
    """
    for m in module.modules():
        params = [p for p in m.parameters(recurse=False) if p.is_floating_point()]
        if not params:
            continue
        dtype = params[0].dtype
        for name, buf in m.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                setattr(m, name, buf.to(dtype))


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm running stats, num_batches_tracked) from rank ``src`` to all ranks.

    DDP does this before every forward (``broadcast_buffers=True``); a DeepSpeed engine never does, so each rank's
    running statistics drift apart on its own shard. Train-mode BatchNorm uses batch statistics, so the running ones
    only matter for evaluation and checkpoints: broadcasting rank 0's right before those gives exactly the buffers
    DDP would have (rank 0's), at no per-step cost. No-op without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for buf in module.buffers():
            dist.broadcast(buf, src)


class StopAgreement:
    """Lets every rank stop at the *same* step boundary after a SIGTERM/SIGINT, which may reach ranks steps apart.

    A rank that stopped alone would enter the (collective) checkpoint while the others wait in the next step's
    gradient all-reduce -- a hang until the process-group timeout. So each step every rank contributes its local
    flag to an all-reduce (max) on a small CPU/gloo group, started asynchronously and read one step later: it never
    syncs with the GPU and its latency hides behind a step. Every rank reads the result of the same collective at
    the same step, so they all agree. Single process: just the local flag.

    The flag is a reason code (``TERM`` < ``INT``) and the reduction a max, so the ranks also agree on *why* they
    stop -- and exit with the same status -- when one got Ctrl-C and another SIGTERM.
    """

    TERM, INT = 1, 2

    def __init__(self, num_processes: int):
        self.local = 0
        self._group = None
        self._pending = None  # (work, buffer) of the all-reduce started last step
        if num_processes > 1 and dist.is_available() and dist.is_initialized():
            # a side group on gloo: its tensors live on the host whatever the main backend (nccl) is
            self._group = dist.new_group(backend="gloo")

    def request(self, reason: int = TERM) -> None:
        """Called from the signal handler: only sets a flag (the loop acts on it at a step boundary)."""
        self.local = max(self.local, int(reason))

    def should_stop(self) -> int:
        """Every rank calls this once per step, in the same steps. The same reason (0 = go on) on every rank."""
        if self._group is None:
            return self.local
        agreed = 0
        if self._pending is not None:
            work, buf = self._pending
            work.wait()
            agreed = int(buf[0])  # a host tensor: no device sync
        buf = torch.tensor([self.local], dtype=torch.int32)
        self._pending = (dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True), buf)
        return agreed

    def close(self) -> None:
        """Finish the outstanding all-reduce (every rank has one, started at the same step)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
