"""torch backend: DataLoader + torchvision transforms over the split tables (the CPU / raw-layout path).

Exact resume and rank-sharding without DistributedSampler: a batch sampler of our own draws the epoch permutation
from (seed, epoch), takes this rank's stride of it, and can start at any batch. Each sample's augmentation is seeded
from (seed, epoch, index), so the pixels a sample gets do not depend on worker count, worker scheduling or where a
resumed run starts -- the property the bitwise resume test relies on.
"""
from __future__ import annotations

import multiprocessing.util
import signal
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_pipeline.image_ops import ImageError, load_rgb as decode_rgb8
from data_pipeline.records import DataError, Record
from data_pipeline.settings import DataSettings
from data_pipeline.splits import EVAL_SPLITS
from data_pipeline.sharding import StreamPosition, epoch_order, meta_batch_size, pad_to_batches
from data_pipeline.types import Batch, EndlessStream, Streams
from data_pipeline.backends.transforms import eval_transform, train_transform


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
        idx = epoch_order(self.n, self.rank, self.world, self.seed, self.epoch, shuffle=self.shuffle,
                          pad=not self.train)
        # eval: whole batches only, so a compiled model sees one shape (padding id -1, dropped after gathering)
        return idx if self.train else pad_to_batches(idx, self.batch_size)

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
_exit_hook_registered = False


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


def _kill_loader_workers_at_exit() -> None:
    """multiprocessing's own exit hook SIGTERMs its daemonic children -- which loader workers ignore -- and then
    joins them without a timeout: a process exiting while an iterator still holds workers (an error raised
    mid-epoch, persistent workers) would hang there. This runs inside that hook, as a finalizer, before its joins
    (see ``_loader``), and SIGKILLs them (they hold nothing that needs saving)."""
    import multiprocessing

    workers = [proc for proc in multiprocessing.active_children() if proc.daemon]
    if workers:  # torch's SIGCHLD handler would raise "DataLoader worker killed" into this exit path
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in workers:
        proc.kill()
    for proc in workers:
        proc.join(timeout=1)


def _loader(dataset: RecordDataset, sampler: ShardedBatchSampler, workers: int, *, persistent: bool) -> DataLoader:
    """persistent: the workers outlive a pass (the next ``iter()`` re-reads the sampler's epoch/start in the main
    process and resumes the same workers). The train and meta streams need that: on 8 ranks an APTOS meta shard is
    ~2 batches, and forking fresh workers every pass would dominate the step. The augmentation is seeded per sample
    (``RecordDataset``), so which worker decodes a sample never changes its pixels and resume stays bitwise."""
    global _exit_hook_registered
    if workers and not _exit_hook_registered:
        # a finalizer with an exit priority runs inside multiprocessing's exit hook *before* it terminates and
        # joins the children, whatever order the atexit hooks were registered in
        multiprocessing.util.Finalize(None, _kill_loader_workers_at_exit, exitpriority=100)
        _exit_hook_registered = True
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
                      pin_memory=torch.cuda.is_available(), persistent_workers=persistent and workers > 0,
                      worker_init_fn=ignore_stop_signals if workers else None)


class TorchTrainStream(StreamPosition):
    """One epoch of this rank's shard per iteration; also the per-pass stream under the endless meta stream."""

    def __init__(self, records, settings: DataSettings, rank, world, seed, *, batch_size: int, augment: bool = True):
        tf = train_transform(settings.image_size, settings.augment) if augment \
            else eval_transform(settings.image_size)
        self.sampler = ShardedBatchSampler(len(records), batch_size, rank, world, seed, shuffle=True, train=True)
        self.loader = _loader(RecordDataset(records, tf, seed, augment=augment), self.sampler, settings.num_workers,
                              persistent=True)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        # the sampler is iterated lazily, on the loader's first batch: it starts at this position
        self.sampler.epoch, self.sampler.start_batch = self.epoch, self.consumed
        for batch in iterate(self.loader):
            self.consumed += 1
            yield batch
        self.consumed = 0


class TorchEvalStream:
    def __init__(self, records, settings: DataSettings, rank, world):
        sampler = ShardedBatchSampler(len(records), settings.eval_batch_size, rank, world, 0,
                                      shuffle=False, train=False)
        self.loader = _loader(RecordDataset(records, eval_transform(settings.image_size), 0, augment=False),
                              sampler, settings.num_workers, persistent=False)  # idle between evaluations

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return iterate(self.loader)


def build_torch_streams(settings: DataSettings, splits: dict[str, list[Record]], rank: int, world: int,
                        device=None) -> Streams:
    meta = splits["meta"]
    meta_stream = TorchTrainStream(meta, settings, rank, world, settings.meta_seed,
                                   batch_size=meta_batch_size(len(meta), world, settings.meta_batch_size),
                                   augment=settings.meta_augment)
    return Streams(
        train=TorchTrainStream(splits["train"], settings, rank, world, settings.seed,
                               batch_size=settings.batch_size),
        meta=EndlessStream(meta_stream),
        eval={s: TorchEvalStream(splits[s], settings, rank, world) for s in EVAL_SPLITS if s in splits},
    )
