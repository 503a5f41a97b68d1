"""The config tree: one dataclass per component, the single source of defaults.

YAML presets override the dataclass defaults; ``key.sub=value`` CLI arguments override the YAML. Unknown keys and
wrong types are errors that name the full dotted key (``ConfigError``). The resolved tree is written to the run dir.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from data_pipeline.backends.registry import BACKENDS, DALI_SHARDING
from data_pipeline.readers.registry import FORMATS
from trainer.components.loss_registry import LOSSES
from trainer.meta.modes import DIRECTIONAL, GRANULARITIES, LOOKAHEAD_OPTIMIZERS, LOOKAHEADS, lagged_real_step_needs
from common.errors import UserError
from trainer.config_io import diff_configs, read_yaml, save_config  # noqa: F401 -- re-exported: callers import them from here


class ConfigError(UserError, ValueError):
    """A config problem a user can fix: names the dotted key (and the file when there is one)."""


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"


@dataclass
class DataConfig:
    root: str = ""
    # aptos | eyepacs | csv | ddr | idrid | messidor2 | prepared ; "auto" guesses from the files under root
    format: str = "auto"
    # auto | dali | torch | synthetic ; auto = dali for a prepared dir when nvidia.dali imports, else torch
    backend: str = "auto"
    image_size: int = 224
    # train, meta, test -- or train, meta, select, test: `select` is scored at the final epoch and no method trains
    # on it (settings are chosen by it in a study; choosing on meta would be in-sample for meta-reweighting)
    split_fractions: list[float] = field(default_factory=lambda: [0.70, 0.15, 0.15])
    # fixed losses (every train.loss but meta) train on train ∪ meta, so they see the labels meta-reweighting sees
    baselines_use_meta_split: bool = False
    # seed of the train/meta/test split; null = train.seed. A study fixes it so every seed is tested on the same images
    split_seed: Optional[int] = None
    # stratified subsample of the train split only (meta and test unchanged); smaller fractions nest in larger ones
    train_fraction: float = 1.0
    num_workers: int = 2
    # generic CSV layout
    path_col: str = "path"
    label_col: str = "label"
    # drop bad rows (with a warning listing them) instead of refusing the data set
    skip_bad: bool = False
    # augment the meta-validation stream too (the paper does not)
    meta_augment: bool = False
    # augmentation ranges (the paper: flip, +-10 degrees, +-10% brightness/contrast)
    hflip: bool = True
    rotate_deg: float = 10.0
    brightness: float = 0.10
    contrast: float = 0.10
    # DALI sharding: "reader" = fn.readers.file(shard_id=rank, num_shards=world, random_shuffle=True), DALI's own
    # shuffle, no per-epoch pipeline rebuild (fastest; mid-epoch resume approximate); "explicit" = per-epoch file lists
    # drawn with the torch backend's permutation (exact resume, same order as the torch backend; one rebuild/epoch)
    dali_sharding: str = "reader"
    # synthetic backend: images held in memory, for benchmarks
    synthetic_samples: int = 256
    # DALI on a GPU node. Share of JPEG decoding given to the A100/H100/H200 hardware decoder (the rest runs in
    # nvJPEG's CUDA/CPU hybrid path); NVIDIA's default moved from 0.65 to 0.90 in DALI 1.x.
    dali_hw_decoder_load: float = 0.90
    # CPU threads per DALI pipeline; 0 = data.num_workers. Each rank runs train + meta pipelines (and the eval ones
    # while evaluating), so a node needs about ranks x 2 x threads cores (docs/PERFORMANCE.md, CPU budget).
    dali_threads: int = 0
    # read files with plain reads instead of mmap: on network file systems (NFS, Lustre, GPFS) mmap of many small
    # files is slow or unreliable
    dali_dont_use_mmap: bool = False


@dataclass
class ModelConfig:
    # tiny | any classifier in torchvision.models.list_models(module=torchvision.models); checked against that
    # registry when the model is built (trainer/components/models/), not here: this module does not import torch
    arch: str = "resnet50"
    # none | imagenet | <path to a .pth state dict>
    pretrained: str = "none"
    num_classes: int = 5
    channels_last: bool = True
    compile: bool = False
    # torch.compile backend (inductor on GPUs; "eager" = dynamo tracing only, for tests)
    compile_backend: str = "inductor"


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    # none | cosine | step
    scheduler: str = "none"
    warmup_steps: int = 0


@dataclass
class MetaConfig:
    # batch (paper: one weight per batch) | class (one per class) | sample (MW-Net: one per sample)
    granularity: str = "batch"
    # exact | second_order | head
    lookahead: str = "exact"
    # sgd | adam (the live Adam state as a diagonal preconditioner)
    lookahead_optimizer: str = "sgd"
    # forward_ad | fd : how `exact` gets the directional derivatives of the per-sample losses
    directional: str = "forward_ad"
    fd_eps: float = 1e-3
    # paper: false, gradients flow through the per-class loss statistics
    detach_features: bool = False
    hidden: list[int] = field(default_factory=lambda: [32, 16])
    lr: float = 1e-3
    # look-ahead step size; 0 = use optim.lr
    lookahead_lr: float = 0.0
    # run the meta step every N real steps
    every: int = 1
    # exact/head reuse the real step's forward of the train batch; false = own forward (lower peak memory)
    share_forward: bool = True
    # exact: tangents through the shared forward's saved activations instead of a dual forward (meta/tangents.py)
    reuse_activations: bool = True
    # same | fp32: look-ahead at train.precision (autocast) or in fp32 (own forward); docs/PERFORMANCE.md
    precision: str = "same"
    # updated (paper: weights of the just-updated φ) | lagged (reuse the virtual gradient: φ one update behind)
    real_step: str = "updated"
    # sample granularity: append the one-hot class to the per-sample loss feature
    sample_one_hot: bool = False
    meta_batch_size: int = 0  # 0 = train.batch_size
    seed_offset: int = 1000  # the meta stream's own shuffling seed = train.seed + seed_offset
    # warn when every weight stays < 1e-3 or > 1 - 1e-3 for this many consecutive steps (collapsed meta-net)
    collapse_steps: int = 20


@dataclass
class LossConfig:
    focal_gamma: float = 2.0
    cb_beta: float = 0.9999
    cb_base: str = "ce"  # ce | focal
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_epoch: int = -1  # -1 = 2/3 of the epochs
    la_tau: float = 1.0


@dataclass
class TrainConfig:
    # ce | weighted_ce | focal | class_balanced | ldam | logit_adjusted | balanced_softmax | meta
    loss: str = "ce"
    epochs: int = 12
    max_steps: int = 0
    batch_size: int = 32
    eval_batch_size: int = 64
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    distributed: str = "ddp"  # ddp | deepspeed
    deepspeed_config: str = ""
    cpu: bool = False  # force CPU even when CUDA is present
    max_bad_steps: int = 5
    deterministic: bool = False
    grad_clip: float = 0.0
    # cuDNN autotuning: training, meta and eval batches all have fixed shapes (eval pads its last batch), so the
    # per-shape search runs once per shape; ignored (off) with train.deterministic
    cudnn_benchmark: bool = True


@dataclass
class EvalConfig:
    # evaluate the meta split every N epochs (and always after the last one); on many GPUs an epoch can be a few
    # steps long, and each evaluation decodes the whole meta split
    every_epochs: int = 1
    # referable DR = grade >= referable_from (2 = moderate or worse, the usual clinical definition); null, or a value
    # outside 1..num_classes-1, = no referable metrics (labels that are not an ordered grade scale)
    referable_from: Optional[int] = 2


@dataclass
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True
    log_images: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = only at epoch end
    # checkpoint at the end of every N-th epoch (the run's end and a SIGTERM always checkpoint)
    every_epochs: int = 1
    keep_last: int = 2
    enabled: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# Names come from each extension point's table (readers, backends, losses, look-ahead modes): add there, not here.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("auto", *FORMATS),
    "data.backend": ("auto", *BACKENDS),
    "data.dali_sharding": DALI_SHARDING,
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.scheduler": ("none", "cosine", "step"),
    "meta.granularity": GRANULARITIES,
    "meta.lookahead": tuple(LOOKAHEADS),
    "meta.lookahead_optimizer": LOOKAHEAD_OPTIMIZERS,
    "meta.directional": DIRECTIONAL,
    "meta.precision": ("same", "fp32"),
    "meta.real_step": ("updated", "lagged"),
    "loss.cb_base": ("ce", "focal"),
    "train.loss": tuple(LOSSES),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.distributed": ("ddp", "deepspeed"),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotation; error names the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` and `3e-4` (no dot) as strings: accept every spelling Python's float() does
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(value):  # float() also reads "nan"/"inf": no setting means that
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            # YAML turns `name: 123` into an int; a string field accepts scalars as their text
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    return value


def _merge(obj: Any, overrides: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' (known under '{prefix or '<root>'}': {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}': expected a mapping of sub-keys, got {value!r}")
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def _validate(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"config key '{dotted}': {value!r} is not one of {', '.join(allowed)}")
    fr = cfg.data.split_fractions
    if len(fr) not in (3, 4) or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"config key 'data.split_fractions': need 3 (train, meta, test) or 4 (train, meta, "
                          f"select, test) positive fractions summing to 1, got {fr}")
    for dotted in ("train.batch_size", "train.eval_batch_size", "data.image_size", "model.num_classes",
                   "meta.every", "logging.every_steps", "checkpoint.keep_last", "train.max_bad_steps",
                   "eval.every_epochs", "checkpoint.every_epochs"):
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"config key '{dotted}': must be >= 1")
    lagged_needs = lagged_real_step_needs(cfg) if cfg.train.loss == "meta" else []
    if lagged_needs:
        raise ConfigError(f"config key 'meta.real_step': lagged needs {', '.join(lagged_needs)}")
    if not 0.0 < cfg.data.train_fraction <= 1.0:
        raise ConfigError(f"config key 'data.train_fraction': must be in (0, 1], got {cfg.data.train_fraction}")
    if not 0.0 <= cfg.data.dali_hw_decoder_load <= 1.0:
        raise ConfigError("config key 'data.dali_hw_decoder_load': must be in [0, 1], got "
                          f"{cfg.data.dali_hw_decoder_load}")
    for dotted in ("train.epochs", "train.max_steps", "checkpoint.every_steps", "data.dali_threads"):
        section, key = dotted.split(".")
        if getattr(getattr(cfg, section), key) < 0:
            raise ConfigError(f"config key '{dotted}': must be >= 0")


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", yaml-parsed value). YAML parsing gives ints, floats, bools, lists for free."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return out


def _merge_overrides(cfg: Config, overrides: list[str]) -> None:
    """Each override merged on its own, so an error names the override the user typed (not the YAML file)."""
    flat = dict(parse_override(o) for o in overrides)
    _nest(flat)  # conflicting overrides (`a=1 a.b=2`) are refused before any is applied
    for text in overrides:
        key, value = parse_override(text)
        try:
            _merge(cfg, _nest({key: value}))
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None


def config_from_dict(data: dict, overrides: Optional[list[str]] = None, *, source: str | None = None) -> Config:
    """``source`` names where ``data`` came from (the YAML path) in errors about it."""
    cfg = Config()
    if data:
        try:
            if not isinstance(data, dict):
                raise ConfigError("config must be a mapping of sections (run, data, model, ...)")
            _merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from None
    if overrides:
        _merge_overrides(cfg, overrides)
    _validate(cfg)
    return cfg


def load_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> Config:
    """Dataclass defaults <- YAML file <- ``key.sub=value`` overrides."""
    if path is not None:
        return config_from_dict(read_yaml(path, ConfigError, "config file"), overrides, source=str(path))
    return config_from_dict({}, overrides)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
