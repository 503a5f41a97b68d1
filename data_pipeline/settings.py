"""What the data layer needs to know, in one small frozen object: built once from the config by the trainer.

The stream builders and the record loader read these fields and nothing else of the config tree, so the data
layer's API describes itself and the data layer never imports the trainer's config.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AugmentSpec:
    """Train-time augmentation ranges (the paper: flip, +-10 degrees, +-10% brightness/contrast)."""
    hflip: bool = True
    rotate_deg: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.1


@dataclass(frozen=True)
class DataSettings:
    # where the data set is and how to read it
    root: str = ""
    format: str = "auto"
    backend: str = "auto"
    num_classes: int = 5
    path_col: str = "path"
    label_col: str = "label"
    skip_bad: bool = False
    synthetic_samples: int = 256
    split_fractions: tuple[float, ...] = (0.70, 0.15, 0.15)
    split_seed: int = 0           # resolved: data.split_seed, or train.seed when that is null
    train_fraction: float = 1.0   # stratified subsample of the train split (nested across fractions)
    # how the streams read it
    image_size: int = 224
    batch_size: int = 32
    eval_batch_size: int = 64
    meta_batch_size: int = 32     # resolved: meta.meta_batch_size, or batch_size when that is 0
    seed: int = 0                 # the train stream's (and the split's) seed
    meta_seed: int = 1000         # the meta stream's own seed: seed + meta.seed_offset
    num_workers: int = 2
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    meta_augment: bool = False
    dali_sharding: str = "reader"
    dali_threads: int = 0         # CPU threads per DALI pipeline; 0 = num_workers
    dali_hw_decoder_load: float = 0.90  # share of JPEGs on the hardware decoder ("mixed" decode)
    dali_dont_use_mmap: bool = False    # plain reads instead of mmap (network file systems)
    cpu: bool = False             # decode on the CPU even when CUDA is present (DALI)

    @classmethod
    def from_config(cls, cfg) -> "DataSettings":
        """From the trainer's ``Config`` (read by attribute: the data layer does not import the trainer)."""
        data, train = cfg.data, cfg.train
        return cls(
            root=data.root, format=data.format, backend=data.backend, num_classes=int(cfg.model.num_classes),
            path_col=data.path_col, label_col=data.label_col, skip_bad=bool(data.skip_bad),
            synthetic_samples=int(data.synthetic_samples), split_fractions=tuple(data.split_fractions),
            split_seed=int(train.seed if data.split_seed is None else data.split_seed),
            train_fraction=float(data.train_fraction),
            image_size=int(data.image_size), batch_size=int(train.batch_size),
            eval_batch_size=int(train.eval_batch_size),
            meta_batch_size=int(cfg.meta.meta_batch_size) or int(train.batch_size),
            seed=int(train.seed), meta_seed=int(train.seed) + int(cfg.meta.seed_offset),
            num_workers=int(data.num_workers),
            augment=AugmentSpec(hflip=bool(data.hflip), rotate_deg=float(data.rotate_deg),
                                brightness=float(data.brightness), contrast=float(data.contrast)),
            meta_augment=bool(data.meta_augment), dali_sharding=data.dali_sharding,
            dali_threads=int(data.dali_threads), dali_hw_decoder_load=float(data.dali_hw_decoder_load),
            dali_dont_use_mmap=bool(data.dali_dont_use_mmap), cpu=bool(train.cpu))
