"""torch backend: DataLoader + torchvision transforms over the split tables (the CPU / raw-layout path).

Exact resume and rank-sharding without DistributedSampler: a batch sampler of our own draws the epoch permutation
from (seed, epoch), takes this rank's stride of it, and can start at any batch. Each sample's augmentation is seeded
from (seed, epoch, index), so the pixels a sample gets do not depend on worker count, worker scheduling or where a
resumed run starts -- the property the bitwise resume test relies on.
"""
from __future__ import annotations

import signal
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_pipeline.image_ops import ImageError, load_rgb as decode_rgb8
from data_pipeline.records import DataError, Record
from data_pipeline.types import Batch, EndlessStream, Streams, shard_indices
from data_pipeline.backends.transforms import augment_kwargs, eval_transform, train_transform


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def load_rgb(path: str) -> Image.Image:
    """The same decode as `metaloss prepare` (EXIF rotation, 16-bit -> high byte, alpha over black, minimum size), so
    training from a raw layout sees the pixels a prepared run would, and refuses exactly the files prepare
    quarantines -- Pillow's plain convert("RGB") would clip 16-bit scans to white and keep transparent borders."""
    try:
        return decode_rgb8(path)[0]
    except ImageError as e:
        # raised in a worker: DataLoader re-raises it in the main process (launch/errors.py strips the worker's
        # traceback from the message)
        raise DataError(f"{path}: cannot read image ({e}); run `metaloss prepare` to quarantine bad files") from None
    except Exception as e:  # noqa: BLE001 -- any other decoder failure is still this file's problem
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e}); run `metaloss prepare` to "
                        f"quarantine bad files") from None


class RecordDataset(Dataset):
    """Items are requested as (index, epoch) pairs so augmentation can be seeded per sample and epoch."""

    def __init__(self, records: list[Record], transform, seed: int, augment: bool):
        self.records = records
        self.transform = transform
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        real = index >= 0
        rec = self.records[index if real else 0]  # padding slot (-1): any image, dropped by the trainer
        image = load_rgb(rec.path)
        if not self.augment:
            return self.transform(image), (rec.label if real else 0), index
        # fork_rng: with num_workers=0 this runs in the trainer's process, whose global RNG must not be reset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            return self.transform(image), (rec.label if real else 0), index


def _collate(items) -> Batch:
    images, labels, ids = zip(*items)
    return Batch(torch.stack(images), torch.tensor(labels, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64))


class ShardedBatchSampler:
    """Yields lists of (index, epoch) for this rank. Shuffled or not, padded (eval) or truncated (train)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, *, shuffle: bool, train: bool):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle, self.train = seed, shuffle, train
        self.epoch = 0
        self.start_batch = 0

    def _indices(self) -> list[int]:
        order = np.arange(self.n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        shard = shard_indices(self.n, self.rank, self.world, pad=not self.train)
        return [int(order[i]) if i >= 0 else -1 for i in shard]

    def __len__(self) -> int:
        per_rank = self.n // self.world if self.train else -(-self.n // self.world)
        return per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = self._indices()
        for b in range(self.start_batch, len(self)):
            yield [(i, self.epoch) for i in idx[b * self.batch_size:(b + 1) * self.batch_size]]


# SLURM (and a terminal's Ctrl-C, and `kill -- -PGID`) signal every process of the job, loader workers included. A
# worker killed by SIGTERM takes the trainer down ("DataLoader worker ... killed by signal") before it can checkpoint,
# so workers ignore the stop signals and the main process alone decides when to stop (trainer.StopAgreement).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn``: runs after torch installs its own worker handlers (SIGTERM -> die), so it wins."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked across the fork (see iterate)


def iterate(loader: DataLoader) -> Iterator[Batch]:
    """Iterate a DataLoader whose workers cannot be killed by a stop signal sent while they start.

    The workers fork inside ``iter(loader)``; until ``ignore_stop_signals`` runs in them they would die of a SIGTERM.
    Blocking the stop signals across the fork closes that window: the children inherit the mask and ignore what was
    pending, and the main process gets a pending signal as soon as the mask is restored.
    """
    if loader.num_workers == 0:
        yield from loader
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        it = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    yield from it


def _loader(dataset: RecordDataset, sampler: ShardedBatchSampler, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      worker_init_fn=ignore_stop_signals if workers else None)


class TorchTrainStream:
    """One epoch of this rank's shard per iteration; also the per-pass stream under the endless meta stream."""

    def __init__(self, records, cfg, rank, world, seed, *, batch_size: int, augment: bool = True):
        tf = train_transform(cfg.data.image_size, **augment_kwargs(cfg.data)) if augment \
            else eval_transform(cfg.data.image_size)
        self.sampler = ShardedBatchSampler(len(records), batch_size, rank, world, seed, shuffle=True, train=True)
        self.loader = _loader(RecordDataset(records, tf, seed, augment=augment), self.sampler, cfg.data.num_workers)
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.sampler.epoch:
            self.sampler.epoch, self.sampler.start_batch, self.consumed = epoch, 0, 0

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.start_batch = self.consumed
        for batch in iterate(self.loader):
            self.consumed += 1
            yield batch
        self.consumed = 0
        self.sampler.start_batch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def _meta_stream(records, cfg, rank, world, seed, batch_size) -> EndlessStream:
    n_shard = len(records) // world
    if n_shard == 0:
        raise DataError(f"meta split has {len(records)} images, fewer than the {world} ranks")
    # a meta batch larger than the shard would never fill: clamp rather than yield nothing forever
    return EndlessStream(TorchTrainStream(records, cfg, rank, world, seed, batch_size=min(batch_size, n_shard),
                                          augment=cfg.data.meta_augment))


class TorchEvalStream:
    def __init__(self, records, cfg, rank, world):
        sampler = ShardedBatchSampler(len(records), cfg.train.eval_batch_size, rank, world, 0,
                                      shuffle=False, train=False)
        self.loader = _loader(RecordDataset(records, eval_transform(cfg.data.image_size), 0, augment=False),
                              sampler, cfg.data.num_workers)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return iterate(self.loader)


def build_torch_streams(cfg, splits: dict[str, list[Record]], rank: int, world: int) -> Streams:
    seed = cfg.train.seed
    meta_bs = cfg.meta.meta_batch_size or cfg.train.batch_size
    train = TorchTrainStream(splits["train"], cfg, rank, world, seed, batch_size=cfg.train.batch_size)
    return Streams(
        train=train,
        meta=_meta_stream(splits["meta"], cfg, rank, world, seed + cfg.meta.seed_offset, meta_bs),
        eval={s: TorchEvalStream(splits[s], cfg, rank, world) for s in ("meta", "test")},
    )
