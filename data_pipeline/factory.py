"""The stream factory: picks a backend for the config and builds its train / meta / eval streams (contract in
:mod:`data_pipeline.types`)."""
from __future__ import annotations

import logging

import torch

from data_pipeline.records import DataError, Record
from data_pipeline.types import Streams

log = logging.getLogger(__name__)


def resolve_backend(cfg) -> str:
    """auto -> dali for a prepared dir when nvidia.dali imports; torch otherwise (raw layouts decode slowly).

    DALI reads prepared dirs only: raw APTOS PNGs are multi-megabyte and some raw sets hold files DALI cannot
    decode (16-bit, CMYK) -- `metaloss prepare` converts or quarantines those once.
    """
    backend = cfg.data.backend
    fmt = cfg.data.format
    if fmt == "auto" and cfg.data.root and backend in ("auto", "dali"):
        from data_pipeline.readers import detect_format

        fmt = detect_format(cfg.data.root)
    if backend == "dali" and fmt not in ("prepared", "auto"):
        raise DataError(f"data.backend=dali reads prepared dirs only, but data.root={cfg.data.root!r} is a raw "
                        f"{fmt} layout: run `metaloss prepare --dataset {fmt} --src {cfg.data.root} --out DIR` "
                        "and train on DIR, or use data.backend=torch")
    if backend != "auto":
        return backend
    if fmt == "prepared":
        try:
            import nvidia.dali  # noqa: F401
            return "dali"
        except ImportError:
            return "torch"
    return "torch"


def build_streams(cfg, splits: dict[str, list[Record]], rank: int = 0, world: int = 1,
                  device: torch.device | None = None) -> Streams:
    """Build train/meta/eval streams for ``cfg.data.backend`` over the given split tables."""
    backend = resolve_backend(cfg)
    counts = [0] * cfg.model.num_classes
    for r in splits["train"]:
        counts[r.label] += 1
    if backend == "torch":
        if cfg.data.format not in ("prepared", "auto"):
            log.warning("training from a raw %s layout: every epoch decodes the full-size originals on the CPU; "
                        "run `metaloss prepare` once for a 10-100x faster loader", cfg.data.format)
        from data_pipeline.backends.torch_backend import build_torch_streams
        streams = build_torch_streams(cfg, splits, rank, world)
    elif backend == "dali":
        from data_pipeline.backends.dali.streams import build_dali_streams
        streams = build_dali_streams(cfg, splits, rank, world, device=device)
    elif backend == "synthetic":
        from data_pipeline.backends.synthetic import build_synthetic_streams
        streams = build_synthetic_streams(cfg, splits, rank, world, device=device)
    else:  # config validation already refuses other names
        raise ValueError(f"unknown data.backend {backend!r}")
    if len(streams.train) == 0:
        raise DataError(f"train split has {len(splits['train'])} images: fewer than one batch of "
                        f"{cfg.train.batch_size} per rank on {world} rank(s); lower train.batch_size")
    streams.backend = backend
    streams.class_counts = counts
    return streams
