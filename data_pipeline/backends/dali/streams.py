"""DALI backend: the three streams of the contract (``data_pipeline/types.py``) decoded and augmented by NVIDIA DALI.

GPU ("mixed" nvJPEG decode, augmentation on the GPU, batches arrive on the device as channels_last views) when
CUDA is present, DALI CPU mode (``device_id=None``) otherwise. Two ways to shard train and meta
(``data.dali_sharding``); the eval streams are the same in both (explicit stride lists, padding id -1, built once).

``reader`` (default) -- DALI shards and shuffles, one pipeline per stream for the whole run (``ReaderRun``):
fn.readers.file(shard_id=rank, num_shards=world, random_shuffle=True, stick_to_shard=True, seed=(seed, rank)) over
the split's file list, which is first permuted with the seed so that which image lands on which rank follows the
seed (DALI's own global shuffle uses a hard-coded seed). Train: every rank yields ``len()`` = floor(smallest shard /
batch) batches per epoch (DALI's shards differ by up to one image), then reads the rest of its pass -- at most one
batch, padding included -- and throws it away, so the next epoch starts on a fresh DALI pass; an epoch is one
shuffled pass over the rank's shard minus its last < batch images, ranks disjoint. Meta: endless; passes follow each
other with no padding and nothing dropped (a batch at a pass boundary spans two passes, so it can hold an image
twice; dropping each pass's partial batch instead would decode and discard up to a batch per pass -- a third of the
meta decoding on a 2-batch shard). Resume (``load_state_dict``: epoch/pass, batches consumed): a pipeline is
built for that epoch with seed (seed, epoch, rank) and the ``consumed`` batches are decoded and dropped. The order
after a resume is DALI's seeded order for that epoch, NOT the one the interrupted run would have read (DALI's
shuffle state is not saved): the same shard and number of steps, and -- with a shard larger than the shuffle buffer,
whose order is a jittered fixed order -- approximately the images it had not yet reached. Also approximate: a
resume between epochs (the pipeline for epoch e is a fresh one, not the e-th pass of the run's first pipeline).

``explicit`` -- exact resume, the torch backend's order, one pipeline build per train epoch. Which sample goes
where is decided here, in Python, and is the SAME index sequence the torch backend draws:
epoch permutation ``default_rng([seed, epoch])``, rank shard ``sharding.shard_indices`` (stride), truncated for
train/meta, padded with id -1 for eval. Each rank's pipeline reads its own explicit, ordered file list
(``fn.readers.file(files=...)``, no reader-side shuffling or sharding). What this buys over ``reader``: DALI's
reader shuffles inside a buffer with an internal RNG whose state is not saved, so there ``set_epoch`` cannot choose
the permutation and a resume cannot land on the same samples. With explicit lists, ``set_epoch(e)`` selects
permutation (seed, e) exactly, resume starts at batch ``consumed`` of that permutation without decoding the skipped
images, and the two backends are interchangeable mid-run. The price: one pipeline build per epoch (train), per
max(4096 samples, 64 batches) (meta), once (eval) -- 0.2-0.6 s each on the CPU; on a GPU also the mixed decoder's
start and the prefetch refill (not measured yet); see docs/perf_data.md.

Explicit-mode resume precision: the *samples* (order, shard, epoch) are exact. The augmentation draws after a
mid-epoch resume are not bit-identical to the uninterrupted run (DALI draws per batch from a pipeline seed; the seed
of a resumed pipeline is derived from (seed, epoch, rank, start batch)); at an epoch boundary they are.

ids: the reader's "label" is a position (explicit / eval: in the pipeline's file list; reader: the split index); a
lookup table maps it to the split index (-1 for eval padding) and to the class label, on the batch's device,
without a host sync.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np
import torch

from data_pipeline.backends.registry import DALI_SHARDING
from data_pipeline.backends.dali.pipelines import ListRun, PipelineSpec, ReaderRun, derive_seed, shard_sizes
from data_pipeline.records import DataError, Record
from data_pipeline.settings import DataSettings
from data_pipeline.splits import EVAL_SPLITS
from data_pipeline.sharding import StreamPosition, epoch_order, meta_batch_size, pad_to_batches, shard_indices
from data_pipeline.types import Batch, Streams

# Seed tags: the train, meta and eval pipelines of one run never share random streams.
_TAG_TRAIN, _TAG_META = 1, 2
# The endless meta stream reads several passes per pipeline so that a small meta shard does not rebuild the
# pipeline every few steps; each pass is still its own (seed, pass) permutation. A rebuild (~0.2 s incl. the first
# decode) then happens at most every max(4096 samples, 64 batches).
META_CHUNK_SAMPLES = 4096
META_CHUNK_BATCHES = 64


def resolve_device_id(settings: DataSettings, device: torch.device | str | None) -> int | None:
    """CUDA device index for "mixed" decode, or None for DALI CPU mode."""
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return None
        return device.index if device.index is not None else torch.cuda.current_device()
    if settings.cpu or not torch.cuda.is_available():
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


class DaliTrainStream(StreamPosition):
    """One epoch of this rank's shard per ``iter()``; a pipeline is built per epoch from the exact index list."""

    def __init__(self, records, spec: PipelineSpec, rank: int, world: int, seed: int):
        self.table, self.spec, self.rank, self.world, self.seed = _SplitTable(records), spec, rank, world, seed

    def __len__(self) -> int:
        return (len(self.table) // self.world) // self.spec.batch_size

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


class DaliMetaStream(StreamPosition):
    """Endless iterator over this rank's meta shard; pass p is permutation (seed, p); never raises StopIteration.

    Like the torch backend: the batch is clamped to the shard size and each pass drops its last partial batch.
    """

    def __init__(self, records, spec: PipelineSpec, rank: int, world: int, seed: int):
        self.table, self.rank, self.world, self.seed = _SplitTable(records), rank, world, seed
        self.spec = dataclasses.replace(spec, batch_size=meta_batch_size(len(self.table), world, spec.batch_size))
        self.batches_per_pass = (len(self.table) // world) // self.spec.batch_size
        self._run = None

    def _pass_indices(self, epoch: int) -> list[int]:
        idx = epoch_order(len(self.table), self.rank, self.world, self.seed, epoch, shuffle=True, pad=False)
        return idx[: self.batches_per_pass * self.spec.batch_size]

    def _next_run(self):
        bs = self.spec.batch_size
        idx = self._pass_indices(self.epoch)[self.consumed * bs:]
        epoch = self.epoch
        while len(idx) < max(META_CHUNK_SAMPLES, META_CHUNK_BATCHES * bs):
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

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._run = None


def _seeded_list(table: _SplitTable, seed: int, tag: int) -> tuple[list[str], list[int]]:
    """The split's files in a seeded order (the same on every rank) and their split indices, for a sharding reader:
    DALI shards this list after its own fixed-seed shuffle, so the seed decides which images each rank gets."""
    order = np.random.default_rng([seed, tag]).permutation(len(table)).tolist()
    return table.files(order), order


class DaliReaderTrainStream(StreamPosition):
    """data.dali_sharding=reader: this rank's DALI-shuffled shard, one pipeline for the whole run (module doc).

    ``len()`` = floor(smallest shard / batch) on every rank. The pipeline is at batch ``_pos`` of its pass, which is
    epoch ``_run_epoch`` of the stream; a pass is ``pass_batches`` >= len() batches (the rest is dropped)."""

    def __init__(self, records, spec: PipelineSpec, rank: int, world: int, seed: int):
        self.table, self.spec, self.rank, self.world, self.seed = _SplitTable(records), spec, rank, world, seed
        self._files, self._positions = _seeded_list(self.table, seed, _TAG_TRAIN)
        self._tables = self.table.tables(range(len(self.table)))
        self._len = min(shard_sizes(len(self.table), world)) // spec.batch_size
        self._run: ReaderRun | None = None
        self._run_epoch, self._pos = 0, 0

    def __len__(self) -> int:
        return self._len

    def _build(self, epoch: int) -> None:
        self._run = None  # release the old pipeline (threads, GPU buffers) before building the next
        self._run = ReaderRun(self.spec, self._files, self._positions, shard_id=self.rank, num_shards=self.world,
                              seed=derive_seed(self.seed, _TAG_TRAIN, epoch, self.rank), pad_last_batch=True,
                              what=f"DALI train stream (rank {self.rank})")
        self._run_epoch, self._pos = epoch, 0

    def _read(self):
        images, pos = self._run.next()
        self._pos += 1
        if self._pos == self._run.pass_batches:
            self._run_epoch, self._pos = self._run_epoch + 1, 0
        return images, pos

    def _seek(self, epoch: int, consumed: int) -> None:
        """Bring the pipeline to batch ``consumed`` of ``epoch``: read on when that is just ahead (the end of the
        previous epoch's pass), otherwise build a pipeline for ``epoch`` and drop ``consumed`` batches (resume)."""
        if self._run is not None and not self._run.broken and self._run_epoch == epoch - 1 and self._pos >= len(self):
            while self._run_epoch != epoch:  # an epoch left after its last step: finish its pass (<= 1 batch)
                self._read()
        if self._run is None or self._run.broken or self._run_epoch != epoch or self._pos > consumed:
            self._build(epoch)
        while self._pos < consumed:
            self._read()

    def __iter__(self) -> Iterator[Batch]:
        self._seek(self.epoch, self.consumed)
        while self.consumed < len(self):
            images, pos = self._read()
            ids, labels = self._tables.lookup(pos)
            self.consumed += 1
            yield Batch(images, labels, ids)
        self.consumed = 0
        while self._pos != 0:  # drop the rest of the pass now: the next epoch's first batch is then prefetched
            self._read()


class DaliReaderMetaStream:
    """data.dali_sharding=reader: endless, DALI-shuffled passes over this rank's meta shard, one pipeline per run.

    Passes run back to back (no padding, nothing dropped); the batch is clamped to the smallest shard, as in the
    explicit stream. The position is counted in samples, so ``state_dict`` reports (pass, whole batches into it)."""

    def __init__(self, records, spec: PipelineSpec, rank: int, world: int, seed: int):
        self.table, self.rank, self.world, self.seed = _SplitTable(records), rank, world, seed
        self.shard_size = shard_sizes(len(self.table), world)[rank]
        self.spec = dataclasses.replace(spec, batch_size=meta_batch_size(len(self.table), world, spec.batch_size))
        self._files, self._positions = _seeded_list(self.table, seed, _TAG_META)
        self._tables = self.table.tables(range(len(self.table)))
        self._samples = 0  # samples read since the start of pass 0
        self._run: ReaderRun | None = None

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._run is None or self._run.broken:
            self._start()
        images, pos = self._run.next()
        self._samples += self.spec.batch_size
        ids, labels = self._tables.lookup(pos)
        return Batch(images, labels, ids)

    def _start(self) -> None:
        """A pipeline whose first pass is the current pass, advanced by the batches already taken from it."""
        state = self.state_dict()
        self._samples = state["epoch"] * self.shard_size + state["consumed"] * self.spec.batch_size
        self._run = None
        self._run = ReaderRun(self.spec, self._files, self._positions, shard_id=self.rank, num_shards=self.world,
                              seed=derive_seed(self.seed, _TAG_META, state["epoch"], self.rank),
                              pad_last_batch=False, what=f"DALI meta stream (rank {self.rank})")
        for _ in range(state["consumed"]):
            self._run.next()

    def state_dict(self) -> dict:
        epoch, offset = divmod(self._samples, self.shard_size)
        return {"epoch": epoch, "consumed": offset // self.spec.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self._samples = int(state["epoch"]) * self.shard_size + int(state["consumed"]) * self.spec.batch_size
        self._run = None


class DaliEvalStream:
    """Finite, unaugmented, unshuffled; every rank runs ceil(ceil(n/world) / batch) full batches, padding slots
    (id -1) fill the rank's shard up to that."""

    def __init__(self, records, spec: PipelineSpec, rank: int, world: int, split: str):
        table = _SplitTable(records)
        self.spec, self.split, self.rank = spec, split, rank
        # whole batches only (types.pad_to_batches): a compiled model then never sees a partial last batch
        self._idx = pad_to_batches(shard_indices(len(table), rank, world, pad=True), spec.batch_size) \
            if len(table) else []
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


def build_dali_streams(settings: DataSettings, splits: dict[str, list[Record]], rank: int, world: int,
                       device: torch.device | str | None = None) -> Streams:
    """Train / meta / eval streams over the split tables (Records with absolute paths, ideally prepared JPEGs)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise DataError("data.backend=dali needs NVIDIA DALI (pip install nvidia-dali-cuda130); "
                          f"or set data.backend=torch ({e})") from None
    device_id = resolve_device_id(settings, device)
    size, threads = settings.image_size, settings.dali_threads or settings.num_workers
    node = dict(hw_decoder_load=settings.dali_hw_decoder_load, dont_use_mmap=settings.dali_dont_use_mmap)
    train_spec = PipelineSpec(size, settings.batch_size, threads, device_id, settings.augment, **node)
    meta_spec = PipelineSpec(size, settings.meta_batch_size, threads, device_id,
                             settings.augment if settings.meta_augment else None, **node)
    eval_spec = PipelineSpec(size, settings.eval_batch_size, threads, device_id, None, **node)

    sharding = settings.dali_sharding
    if sharding not in DALI_SHARDING:  # config validation refuses other values already
        raise ValueError(f"data.dali_sharding must be 'reader' or 'explicit', got {sharding!r}")
    train_cls, meta_cls = ((DaliReaderTrainStream, DaliReaderMetaStream) if sharding == "reader"
                           else (DaliTrainStream, DaliMetaStream))
    return Streams(
        train=train_cls(splits["train"], train_spec, rank, world, settings.seed),
        meta=meta_cls(splits["meta"], meta_spec, rank, world, settings.meta_seed),
        eval={s: DaliEvalStream(splits[s], eval_spec, rank, world, s) for s in EVAL_SPLITS if s in splits},
    )
