"""synthetic backend: random tensors held on the training device, for benchmarks that must not wait on I/O.

Same contract as the other backends. Split tables are used only for their sizes and labels, so class imbalance is
realistic; pixels are random (seeded), generated once and re-used every epoch.
"""
from __future__ import annotations

from typing import Iterator

import torch

from data_pipeline.records import Record
from data_pipeline.splits import EVAL_SPLITS
from data_pipeline.types import Batch, EndlessStream, Streams, shard_indices


def _tensors(records: list[Record], size: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(records), 3, size, size, generator=g)
    labels = torch.tensor([r.label for r in records], dtype=torch.int64)
    return images.to(device), labels.to(device)


class _Shard:
    def __init__(self, records, size, seed, rank, world, device, *, pad: bool):
        self.images, self.labels = _tensors(records, size, seed, device)
        # indices live on the device with the images: a per-batch host->device copy would sync every step
        self.idx = torch.tensor(shard_indices(len(records), rank, world, pad=pad), dtype=torch.int64,
                                device=self.images.device)

    def batch(self, positions: torch.Tensor) -> Batch:
        ids = self.idx[positions]
        safe = ids.clamp(min=0)
        return Batch(self.images[safe], self.labels[safe], ids)


class SyntheticTrainStream:
    def __init__(self, records, size, batch_size, seed, rank, world, device):
        self.shard = _Shard(records, size, seed, rank, world, device, pad=False)
        self.batch_size, self.seed, self.epoch, self.consumed = batch_size, seed, 0, 0

    def __len__(self) -> int:
        return len(self.shard.idx) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.shard.idx), generator=g).to(self.shard.idx.device)  # once per epoch
        for b in range(self.consumed, len(self)):
            self.consumed = b + 1
            yield self.shard.batch(order[b * self.batch_size:(b + 1) * self.batch_size])
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


class SyntheticEvalStream:
    def __init__(self, records, size, batch_size, seed, rank, world, device):
        self.shard = _Shard(records, size, seed, rank, world, device, pad=True)
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


def build_synthetic_streams(cfg, splits: dict[str, list[Record]], rank: int, world: int,
                            device=None) -> Streams:
    device = device or torch.device("cpu")
    size, seed = cfg.data.image_size, cfg.train.seed
    meta_bs = cfg.meta.meta_batch_size or cfg.train.batch_size
    meta_shard = max(1, len(splits["meta"]) // world)  # a meta batch larger than the shard would never fill
    return Streams(
        train=SyntheticTrainStream(splits["train"], size, cfg.train.batch_size, seed, rank, world, device),
        meta=EndlessStream(SyntheticTrainStream(splits["meta"], size, min(meta_bs, meta_shard),
                                                seed + cfg.meta.seed_offset, rank, world, device)),
        eval={s: SyntheticEvalStream(splits[s], size, cfg.train.eval_batch_size, seed + _EVAL_SEED_OFFSET[s], rank,
                                     world, device)
              for s in EVAL_SPLITS if s in splits},
    )
