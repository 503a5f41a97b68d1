"""DALI backend: the three streams of ``streams.py`` decoded and augmented by NVIDIA DALI.

GPU ("mixed" nvJPEG decode, augmentation on the GPU, batches arrive on the device as channels_last views) when
CUDA is present, DALI CPU mode (``device_id=None``) otherwise.

Which sample goes where is decided here, in Python, and is the SAME index sequence the torch backend draws:
epoch permutation ``default_rng([seed, epoch])``, rank shard ``streams.shard_indices`` (stride), truncated for
train/meta, padded with id -1 for eval. Each rank's pipeline reads its own explicit, ordered file list
(``fn.readers.file(files=...)``, no reader-side shuffling or sharding). Why not ``shard_id/num_shards`` +
``random_shuffle``: DALI's reader shards contiguously ``[floor(r*n/w), floor((r+1)*n/w))``, moves every rank to the
next shard each epoch unless ``stick_to_shard``, and shuffles only inside a 1024-sample buffer with an internal RNG
-- so ``set_epoch`` could not choose the permutation and a resume could not land on the same samples. With explicit
lists, ``set_epoch(e)`` selects permutation (seed, e) exactly, resume starts at batch ``consumed`` of that
permutation without decoding the skipped images, and the two backends are interchangeable mid-run.
The price: one pipeline build per epoch (train), per few thousand samples (meta), once (eval) -- milliseconds on
the CPU; see docs/perf_data.md.

Resume precision: the *samples* (order, shard, epoch) are exact. The augmentation draws after a mid-epoch resume
are not bit-identical to the uninterrupted run (DALI draws per batch from a pipeline seed; the seed of a resumed
pipeline is derived from (seed, epoch, rank, start batch)); at an epoch boundary they are.

ids: the reader's "label" is the position in the pipeline's file list; a lookup table maps it to the split index
(-1 for eval padding) and to the class label, on the batch's device, without a host sync.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from .dali_pipelines import AugmentSpec, ListRun, PipelineSpec, derive_seed
from .records import DataError, Record
from .streams import Batch, Streams, shard_indices

# Seed tags: the train, meta and eval pipelines of one run never share random streams.
_TAG_TRAIN, _TAG_META = 1, 2
# The endless meta stream reads several passes per pipeline so that a small meta shard does not rebuild the
# pipeline every few steps; each pass is still its own (seed, pass) permutation.
META_CHUNK_SAMPLES = 4096


def epoch_order(n: int, rank: int, world: int, seed: int, epoch: int, *, shuffle: bool, pad: bool) -> list[int]:
    """This rank's split indices for one epoch -- identical to the torch backend's ShardedBatchSampler."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [int(order[i]) if i >= 0 else -1 for i in shard_indices(n, rank, world, pad=pad)]


def resolve_device_id(cfg, device: torch.device | str | None) -> int | None:
    """CUDA device index for "mixed" decode, or None for DALI CPU mode."""
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return None
        return device.index if device.index is not None else torch.cuda.current_device()
    if getattr(cfg.train, "cpu", False) or not torch.cuda.is_available():
        return None
    return torch.cuda.current_device()


class _Tables:
    """Position -> (split id, label) lookup on the batch's device (moved there once per pipeline, not per batch)."""

    def __init__(self, ids: Sequence[int], labels: Sequence[int]):
        self._cpu = (torch.tensor(list(ids), dtype=torch.int64), torch.tensor(list(labels), dtype=torch.int64))
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = pos.device
        if dev not in self._on:
            self._on[dev] = tuple(t.to(dev) for t in self._cpu)
        ids, labels = self._on[dev]
        return ids[pos], labels[pos]


class _SplitTable:
    def __init__(self, records: Sequence[Record]):
        self.paths = [r.path for r in records]
        self.labels = [int(r.label) for r in records]

    def __len__(self) -> int:
        return len(self.paths)

    def files(self, idx: Sequence[int]) -> list[str]:
        return [self.paths[i if i >= 0 else 0] for i in idx]

    def tables(self, idx: Sequence[int]) -> _Tables:
        # padding slots (-1) carry label 0, as in the torch backend; the trainer drops them by id
        return _Tables(idx, [self.labels[i] if i >= 0 else 0 for i in idx])


class DaliTrainStream:
    """One epoch of this rank's shard per ``iter()``; a pipeline is built per epoch from the exact index list."""

    def __init__(self, records, spec: PipelineSpec, rank: int, world: int, seed: int):
        self.table, self.spec, self.rank, self.world, self.seed = _SplitTable(records), spec, rank, world, seed
        self.epoch, self.consumed = 0, 0

    def __len__(self) -> int:
        return (len(self.table) // self.world) // self.spec.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        bs = self.spec.batch_size
        idx = epoch_order(len(self.table), self.rank, self.world, self.seed, self.epoch, shuffle=True, pad=False)
        idx = idx[self.consumed * bs: len(self) * bs]
        if idx:
            run = ListRun(self.spec, self.table.files(idx),
                          seed=derive_seed(self.seed, _TAG_TRAIN, self.epoch, self.rank, self.consumed),
                          what=f"DALI train stream (rank {self.rank}, epoch {self.epoch})")
            tables = self.table.tables(idx)
            for images, pos in run:
                ids, labels = tables.lookup(pos)
                self.consumed += 1
                yield Batch(images, labels, ids)
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


class DaliMetaStream:
    """Endless iterator over this rank's meta shard; pass p is permutation (seed, p); never raises StopIteration.

    Like the torch backend: the batch is clamped to the shard size and each pass drops its last partial batch.
    """

    def __init__(self, records, spec: PipelineSpec, rank: int, world: int, seed: int):
        self.table, self.rank, self.world, self.seed = _SplitTable(records), rank, world, seed
        n_shard = len(self.table) // world
        if n_shard == 0:
            raise DataError(f"meta split has {len(self.table)} images, fewer than the {world} ranks")
        self.spec = PipelineSpec(spec.image_size, min(spec.batch_size, n_shard), spec.num_threads,
                                 spec.device_id, spec.augment)
        self.batches_per_pass = n_shard // self.spec.batch_size
        self.epoch, self.consumed = 0, 0
        self._run = None

    def _pass_indices(self, epoch: int) -> list[int]:
        idx = epoch_order(len(self.table), self.rank, self.world, self.seed, epoch, shuffle=True, pad=False)
        return idx[: self.batches_per_pass * self.spec.batch_size]

    def _next_run(self):
        bs = self.spec.batch_size
        idx = self._pass_indices(self.epoch)[self.consumed * bs:]
        epoch = self.epoch
        while len(idx) < META_CHUNK_SAMPLES:
            epoch += 1
            idx += self._pass_indices(epoch)
        run = ListRun(self.spec, self.table.files(idx),
                      seed=derive_seed(self.seed, _TAG_META, self.epoch, self.rank, self.consumed),
                      what=f"DALI meta stream (rank {self.rank}, pass {self.epoch})")
        tables = self.table.tables(idx)
        for images, pos in run:
            yield images, pos, tables

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        while True:
            if self._run is None:
                self._run = self._next_run()
            try:
                images, pos, tables = next(self._run)
            except StopIteration:
                self._run = None
                continue
            ids, labels = tables.lookup(pos)
            self.consumed += 1
            if self.consumed == self.batches_per_pass:
                self.epoch, self.consumed = self.epoch + 1, 0
            return Batch(images, labels, ids)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed, self._run = int(state["epoch"]), int(state["consumed"]), None


class DaliEvalStream:
    """Finite, unaugmented, unshuffled; every rank runs ceil(n/world) samples, padding slots carry id -1."""

    def __init__(self, records, spec: PipelineSpec, rank: int, world: int, split: str):
        table = _SplitTable(records)
        self.num_samples = len(table)
        self.spec, self.split, self.rank = spec, split, rank
        self._idx = shard_indices(len(table), rank, world, pad=True) if len(table) else []
        self._files = table.files(self._idx)
        self._tables = table.tables(self._idx)
        self._run = None  # built on first use: eval streams are idle for most of a run

    def __len__(self) -> int:
        return -(-len(self._idx) // self.spec.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if not self._idx:
            return
        if self._run is None:
            self._run = ListRun(self.spec, self._files, seed=0,
                                what=f"DALI eval stream '{self.split}' (rank {self.rank})")
        for images, pos in self._run:
            ids, labels = self._tables.lookup(pos)
            yield Batch(images, labels, ids)


def build_dali_streams(cfg, splits: dict[str, list[Record]], rank: int, world: int,
                       device: torch.device | str | None = None) -> Streams:
    """Train / meta / eval streams over the split tables (Records with absolute paths, ideally prepared JPEGs)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ImportError("data.backend=dali needs NVIDIA DALI (pip install nvidia-dali-cuda130); "
                          f"or set data.backend=torch ({e})") from None
    device_id = resolve_device_id(cfg, device)
    size, threads = int(cfg.data.image_size), int(cfg.data.num_workers)
    train_aug = AugmentSpec.from_data_cfg(cfg.data)
    train_spec = PipelineSpec(size, int(cfg.train.batch_size), threads, device_id, train_aug)
    meta_bs = int(cfg.meta.meta_batch_size) or int(cfg.train.batch_size)
    meta_spec = PipelineSpec(size, meta_bs, threads, device_id, train_aug if cfg.data.meta_augment else None)
    eval_spec = PipelineSpec(size, int(cfg.train.eval_batch_size), threads, device_id, None)

    seed = int(cfg.train.seed)
    train = DaliTrainStream(splits["train"], train_spec, rank, world, seed)
    if len(train) == 0:
        raise DataError(f"train split has {len(splits['train'])} images: fewer than one batch of "
                        f"{cfg.train.batch_size} per rank on {world} rank(s); lower train.batch_size")
    return Streams(
        train=train,
        meta=DaliMetaStream(splits["meta"], meta_spec, rank, world, seed + int(cfg.meta.seed_offset)),
        eval={s: DaliEvalStream(splits[s], eval_spec, rank, world, s) for s in ("meta", "test")},
    )
