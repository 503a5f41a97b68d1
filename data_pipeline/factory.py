"""The stream factory: picks a backend for the data settings and builds its train / meta / eval streams (contract
in :mod:`data_pipeline.types`, backends by name in :mod:`data_pipeline.backends.registry`)."""
from __future__ import annotations

import logging

from common.registry import load
from data_pipeline.backends.registry import BACKENDS
from data_pipeline.records import DataError, Record
from data_pipeline.settings import DataSettings
from data_pipeline.types import Streams

log = logging.getLogger(__name__)


def resolve_backend(settings: DataSettings) -> str:
    """auto -> dali for a prepared dir when nvidia.dali imports; torch otherwise (raw layouts decode slowly).

    DALI reads prepared dirs only: raw APTOS PNGs are multi-megabyte and some raw sets hold files DALI cannot
    decode (16-bit, CMYK) -- `metaloss prepare` converts or quarantines those once.
    """
    backend = settings.backend
    fmt = settings.format
    if fmt == "auto" and settings.root and backend in ("auto", "dali"):
        from data_pipeline.readers import detect_format

        fmt = detect_format(settings.root)
    if backend == "dali" and fmt not in ("prepared", "auto"):
        raise DataError(f"data.backend=dali reads prepared dirs only, but data.root={settings.root!r} is a raw "
                        f"{fmt} layout: run `metaloss prepare --dataset {fmt} --src {settings.root} --out DIR` "
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


def build_streams(settings: DataSettings, splits: dict[str, list[Record]], rank: int = 0, world: int = 1,
                  device=None) -> Streams:
    """Build train/meta/eval streams for ``settings.backend`` over the given split tables."""
    backend = resolve_backend(settings)
    if backend not in BACKENDS:  # config validation already refuses other names
        raise ValueError(f"unknown data.backend {backend!r}")
    counts = [0] * settings.num_classes
    for r in splits["train"]:
        counts[r.label] += 1
    if backend == "torch" and settings.format not in ("prepared", "auto"):
        log.warning("training from a raw %s layout: every epoch decodes the full-size originals on the CPU; "
                    "run `metaloss prepare` once for a 10-100x faster loader", settings.format)
    streams = load(BACKENDS, backend)(settings, splits, rank, world, device=device)
    if len(streams.train) == 0:
        raise DataError(f"train split has {len(splits['train'])} images: fewer than one batch of "
                        f"{settings.batch_size} per rank on {world} rank(s); lower train.batch_size")
    streams.backend = backend
    streams.class_counts = counts
    return streams
