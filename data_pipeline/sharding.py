"""Which samples a rank reads, and where a stream stands: the pieces every backend shares (torch-free).

* ``shard_indices`` / ``pad_to_batches`` / ``epoch_order``: the epoch permutation ``default_rng([seed, epoch])`` and the rank's stride of
  it -- the torch backend and DALI ``explicit`` sharding draw the SAME sequence, so they are interchangeable mid-run.
* ``meta_batch_size``: the meta stream's batch, clamped to the smallest rank shard (a larger batch would never fill).
* ``StreamPosition``: the (epoch, batches consumed) state a train stream saves in a checkpoint.
"""
from __future__ import annotations

import numpy as np

from data_pipeline.records import DataError


def shard_indices(n: int, rank: int, world: int, *, pad: bool) -> list[int]:
    """Contiguous-stride shard of range(n): rank r takes r, r+world, ...

    pad=True pads every rank to ceil(n/world) with -1 (eval: everyone runs the same number of batches);
    pad=False truncates to floor(n/world) (train: equal step counts so DDP all-reduces line up).
    """
    idx = list(range(rank, n, world))
    if pad:
        per_rank = -(-n // world)
        idx += [-1] * (per_rank - len(idx))
    else:
        idx = idx[: n // world]
    return idx


def pad_to_batches(idx: list[int], batch_size: int) -> list[int]:
    """Eval shards: pad with id -1 up to a whole number of batches, so every eval batch has the same shape (a
    compiled model then never recompiles for a last partial batch)."""
    return idx + [-1] * (-len(idx) % batch_size)


def epoch_order(n: int, rank: int, world: int, seed: int, epoch: int, *, shuffle: bool, pad: bool) -> list[int]:
    """This rank's split indices for one epoch: permutation (seed, epoch) of range(n), then the rank's stride."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [int(order[i]) if i >= 0 else -1 for i in shard_indices(n, rank, world, pad=pad)]


def meta_batch_size(n: int, world: int, batch_size: int) -> int:
    """The meta batch for a meta split of ``n`` images on ``world`` ranks: refused when a rank would get no image,
    clamped to the smallest shard (floor(n / world)) so that one pass always holds at least one batch."""
    smallest_shard = n // world
    if smallest_shard == 0:
        raise DataError(f"meta split has {n} images, fewer than the {world} ranks")
    return min(batch_size, smallest_shard)


class StreamPosition:
    """(epoch, batches consumed in it): ``set_epoch`` starts an epoch, ``state_dict`` is what a checkpoint holds.

    Mixed into the train streams of every backend; ``consumed`` is advanced by the stream as it yields."""

    epoch: int = 0
    consumed: int = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
