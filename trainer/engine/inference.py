"""A trained model back from a run dir or one of its checkpoints, for `metaloss eval` and `metaloss predict`.

``RUN_DIR`` means its newest complete checkpoint; ``RUN_DIR/checkpoints/step_N`` that one. The run's config.yaml
says which model to build (arch, class count, image size). Weights: the ``pytorch_model.bin`` Accelerate writes for
DDP/single-process runs; for DeepSpeed ZeRO runs the per-rank partitions are consolidated into fp32 weights with
DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` (or, if that fails, a one-line refusal saying how to
consolidate by hand).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import UserError
from trainer.config import Config, load_config
from trainer.engine.checkpoint import MARKER, CheckpointError, list_checkpoints

log = logging.getLogger(__name__)

WEIGHTS_FILE = "pytorch_model.bin"
DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate gives DeepSpeed's save_checkpoint
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class InferenceError(UserError, ValueError):
    """The checkpoint cannot be used as asked (missing, wrong shape, partitioned weights): one line, how to fix."""


@dataclass
class TrainedModel:
    cfg: Config
    model: torch.nn.Module
    run_dir: Path
    checkpoint: Path

    @property
    def num_classes(self) -> int:
        return self.cfg.model.num_classes


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for a run dir or a checkpoint dir."""
    path = Path(path)
    if not path.is_dir():
        raise InferenceError(f"{path}: no such run dir or checkpoint dir")
    if (path / MARKER).is_file():
        return path.parent.parent, path
    if path.name.startswith(("step_", ".tmp-step_")):
        raise InferenceError(f"{path}: incomplete checkpoint (no {MARKER} marker); use an earlier one")
    found = list_checkpoints(path)
    if not found:
        raise InferenceError(f"{path}: no complete checkpoint under {path / 'checkpoints'} (is it a run dir? "
                             "training writes one at every epoch end)")
    return path, found[0]


def _strip(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _deepspeed_weights(ckpt: Path) -> dict:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_TAG)
    except Exception as e:  # noqa: BLE001 -- missing package, missing rank file, version mismatch: same advice
        raise InferenceError(
            f"{ckpt} holds DeepSpeed ZeRO partitions that could not be consolidated ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); consolidate them by hand with `python "
            f"{ckpt / 'zero_to_fp32.py'} {ckpt} {ckpt / WEIGHTS_FILE} --tag {DEEPSPEED_TAG}` (or `python -m "
            f"deepspeed.utils.zero_to_fp32 ...`) and run again") from None


def load_weights(ckpt: Path) -> dict:
    if (ckpt / WEIGHTS_FILE).is_file():
        state = torch.load(ckpt / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    elif (ckpt / DEEPSPEED_TAG).is_dir():
        log.info("consolidating DeepSpeed ZeRO partitions of %s into fp32 weights", ckpt)
        state = _deepspeed_weights(ckpt)
    else:
        raise InferenceError(f"{ckpt}: no model weights ({WEIGHTS_FILE} or {DEEPSPEED_TAG}/) in this checkpoint")
    return _strip(state)


def load_trained_model(path: str | Path, *, num_classes: int | None = None,
                       image_size: int | None = None) -> TrainedModel:
    """Build the run's model and load the checkpoint's weights (CPU, eval mode). ``num_classes`` / ``image_size``
    are what the caller's data needs; a model that does not fit them is refused, naming both numbers."""
    from trainer.components.models import build_model

    run_dir, ckpt = resolve_checkpoint(path)
    if not (run_dir / "config.yaml").is_file():
        raise InferenceError(f"{run_dir}: no config.yaml next to the checkpoint (not a metaloss run dir)")
    cfg = load_config(run_dir / "config.yaml")
    if num_classes is not None and num_classes != cfg.model.num_classes:
        raise InferenceError(f"{ckpt} was trained for {cfg.model.num_classes} classes, the data has "
                             f"{num_classes}: evaluate on a data set with the same grade scale")
    if image_size is not None and image_size != cfg.data.image_size:
        raise InferenceError(f"{ckpt} was trained at image size {cfg.data.image_size}, asked for {image_size}: "
                             f"drop --image-size or pass {cfg.data.image_size}")
    cfg.model.pretrained = "none"  # the checkpoint has every weight; do not look for downloads
    model = build_model(cfg.model)
    state = load_weights(ckpt)
    own = model.state_dict()
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and
              tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        k, got, want = shapes[0]
        raise InferenceError(f"{ckpt}: weight {k} has shape {got}, the {cfg.model.arch} with "
                             f"{cfg.model.num_classes} classes of its config.yaml needs {want} (config and "
                             "checkpoint from different runs?)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InferenceError(f"{ckpt}: weights do not match the {cfg.model.arch} of its config.yaml (missing "
                             f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    model.eval()
    return TrainedModel(cfg=cfg, model=model, run_dir=run_dir, checkpoint=ckpt)
