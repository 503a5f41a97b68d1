"""The data contract: what every stream backend yields and the trainer relies on (nothing else).

The factory that picks a backend is :mod:`data_pipeline.factory`; backends live in :mod:`data_pipeline.backends`;
what they share (epoch permutation, rank shards, stream position) in :mod:`data_pipeline.sharding`.
Contract shared by every backend (``torch``, ``dali``, ``synthetic``) -- the trainer relies on nothing else:

* ``streams.train``: iterable over ONE epoch of this rank's shard, yielding :class:`Batch`; ``len()`` = batches per
  epoch on this rank (the same on every rank, last partial batch dropped, so DDP ranks never wait on each other);
  ``set_epoch(e)`` starts epoch e. ``state_dict()/load_state_dict()`` hold (epoch, batches already consumed).
  torch, synthetic and DALI ``explicit`` sharding draw the epoch's permutation from (seed, epoch), so a resumed run
  sees exactly the samples (and, torch: the augmentations) it would have; DALI ``reader`` sharding (the default,
  no pipeline rebuilds) shuffles inside DALI, so a mid-epoch resume skips the right number of batches but in
  DALI's seeded order, not the interrupted run's.
* ``streams.meta``: an endless iterator (``next(streams.meta)``) over this rank's shard of the meta split, with its
  own seed; it re-shuffles after each pass and never raises StopIteration. ``state_dict()/load_state_dict()``.
* ``streams.eval[split]`` for split in ("meta", "test"; also "select" when the split has one): finite,
  unaugmented, yields :class:`Batch` whose ``ids`` index the split; every batch is exactly
  ``train.eval_batch_size`` long (``pad_to_batches``) so a compiled model sees one eval shape and never recompiles
  for a last partial batch. Padding samples (added so every rank runs the
  same number of full batches) carry id -1 and the trainer drops them after gathering, so every image is counted
  exactly once across ranks.

Images are float32 N x 3 x H x W, ImageNet-normalised; labels int64 N; ids int64 N. A backend may yield them on the
GPU already (DALI "mixed"); the trainer moves them with ``.to(device, non_blocking=True)``, a no-op there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from data_pipeline.records import DataError

if TYPE_CHECKING:  # the contract itself needs no torch: importing it stays cheap
    import torch


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor


class TrainStream(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class EndlessStream:
    """The meta stream over any epoch stream: each pass is the next epoch (re-shuffled by the inner stream's seed),
    and StopIteration never reaches the trainer. Position = the inner stream's (epoch, consumed)."""

    def __init__(self, epochs: TrainStream):
        if len(epochs) == 0:  # would loop forever looking for a batch
            raise DataError("the meta stream has no batch per pass (meta split smaller than one batch per rank)")
        self.epochs = epochs
        self._it: Iterator[Batch] | None = None

    def __iter__(self) -> "EndlessStream":
        return self

    def __next__(self) -> Batch:
        while True:
            if self._it is None:
                self._it = iter(self.epochs)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epochs.set_epoch(self.epochs.state_dict()["epoch"] + 1)

    def state_dict(self) -> dict:
        return self.epochs.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.epochs.load_state_dict(state)
        self._it = None


@dataclass
class Streams:
    train: TrainStream
    meta: Any
    eval: dict[str, Any] = field(default_factory=dict)
    backend: str = ""
    class_counts: list[int] = field(default_factory=list)  # train-split counts per class (for loss weights)
