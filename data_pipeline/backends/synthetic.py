"""synthetic backend: random tensors held on the training device, for benchmarks that must not wait on I/O.

Same contract as the other backends. Split tables are used only for their sizes and labels, so class imbalance is
realistic; pixels are random (seeded), generated once and re-used every epoch.
"""
from __future__ import annotations

from typing import Iterator

import torch

from data_pipeline.records import Record
from data_pipeline.settings import DataSettings
from data_pipeline.splits import EVAL_SPLITS
from data_pipeline.sharding import StreamPosition, meta_batch_size, pad_to_batches, shard_indices
from data_pipeline.types import Batch, EndlessStream, Streams


def _tensors(records: list[Record], size: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(records), 3, size, size, generator=g)
    labels = torch.tensor([r.label for r in records], dtype=torch.int64)
    return images.to(device), labels.to(device)


class _Shard:
    def __init__(self, records, size, seed, rank, world, device, *, pad_batch: int = 0):
        self.images, self.labels = _tensors(records, size, seed, device)
        idx = shard_indices(len(records), rank, world, pad=pad_batch > 0)
        if pad_batch:  # eval: whole batches only (types.pad_to_batches)
            idx = pad_to_batches(idx, pad_batch)
        # indices live on the device with the images: a per-batch host->device copy would sync every step
        self.idx = torch.tensor(idx, dtype=torch.int64, device=self.images.device)

    def batch(self, positions: torch.Tensor) -> Batch:
        ids = self.idx[positions]
        safe = ids.clamp(min=0)
        return Batch(self.images[safe], self.labels[safe], ids)


class SyntheticTrainStream(StreamPosition):
    def __init__(self, records, size, batch_size, seed, rank, world, device):
        self.shard = _Shard(records, size, seed, rank, world, device)
        self.batch_size, self.seed = batch_size, seed

    def __len__(self) -> int:
        return len(self.shard.idx) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.shard.idx), generator=g).to(self.shard.idx.device)  # once per epoch
        for b in range(self.consumed, len(self)):
            self.consumed = b + 1
            yield self.shard.batch(order[b * self.batch_size:(b + 1) * self.batch_size])
        self.consumed = 0


class SyntheticEvalStream:
    def __init__(self, records, size, batch_size, seed, rank, world, device):
        self.shard = _Shard(records, size, seed, rank, world, device, pad_batch=batch_size)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.shard.idx) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for b in range(len(self)):
            yield self.shard.batch(torch.arange(b * self.batch_size, min((b + 1) * self.batch_size,
                                                                          len(self.shard.idx)),
                                                device=self.shard.idx.device))


# meta and test keep the offsets they had before the select split existed (same pixels as before)
_EVAL_SEED_OFFSET = {"meta": 7, "test": 8, "select": 9}


def build_synthetic_streams(settings: DataSettings, splits: dict[str, list[Record]], rank: int, world: int,
                            device=None) -> Streams:
    device = device or torch.device("cpu")
    size, seed, meta = settings.image_size, settings.seed, splits["meta"]
    return Streams(
        train=SyntheticTrainStream(splits["train"], size, settings.batch_size, seed, rank, world, device),
        meta=EndlessStream(SyntheticTrainStream(meta, size, meta_batch_size(len(meta), world, settings.meta_batch_size),
                                                settings.meta_seed, rank, world, device)),
        eval={s: SyntheticEvalStream(splits[s], size, settings.eval_batch_size, seed + _EVAL_SEED_OFFSET[s], rank,
                                     world, device)
              for s in EVAL_SPLITS if s in splits},
    )
