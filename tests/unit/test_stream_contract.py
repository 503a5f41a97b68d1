"""The stream contract (data_pipeline/types.py) held by every backend: torch, synthetic, DALI CPU mode with both
``dali_sharding`` modes. Two ranks are simulated in one process (rank 0 and 1 of world 2, built side by side).

Exact samples after a mid-epoch resume are asserted only where the mode promises them (torch, synthetic, DALI
``explicit``); DALI ``reader`` sharding resumes the position (epoch, batches left), not the order, by design.
"""
from __future__ import annotations

import pytest
import torch

from data_pipeline.factory import build_streams
from data_pipeline.settings import DataSettings
from tests.support.dali_fixtures import S

WORLD, BS, META_BS, EVAL_BS = 2, 3, 2, 4
# (backend, dali_sharding, exact resume promised)
BACKENDS = [("torch", "reader", True), ("synthetic", "reader", True), ("dali", "explicit", True),
            ("dali", "reader", False)]


@pytest.fixture(params=BACKENDS, ids=["torch", "synthetic", "dali-explicit", "dali-reader"])
def backend(request):
    name, sharding, exact = request.param
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    settings = DataSettings(backend=name, dali_sharding=sharding, image_size=S, batch_size=BS,
                            eval_batch_size=EVAL_BS, meta_batch_size=META_BS, seed=5, meta_seed=1005,
                            num_workers=1 if name == "dali" else 0, cpu=True)
    return settings, exact


@pytest.fixture
def splits(records):
    return {"train": records[:14], "meta": records[14:19], "test": records[19:]}


def _ranks(settings, splits):
    return [build_streams(settings, splits, rank, WORLD, device=torch.device("cpu")) for rank in range(WORLD)]


def _ids(batches) -> list[int]:
    return [i for b in batches for i in b.ids.tolist()]


def _check_batch(b, split, size):
    assert b.images.shape == (size, 3, S, S) and b.images.dtype == torch.float32
    assert b.labels.dtype == torch.int64 and b.ids.dtype == torch.int64
    assert b.labels.tolist() == [split[i].label for i in b.ids.tolist()]


def test_train_len_epochs_and_rank_shards(backend, splits):
    settings, _ = backend
    per_rank = []
    for streams in _ranks(settings, splits):
        train = streams.train
        assert len(train) == (len(splits["train"]) // WORLD) // BS  # same on every rank, last partial dropped
        epochs = []
        for epoch in (0, 1):
            train.set_epoch(epoch)
            assert train.state_dict() == {"epoch": epoch, "consumed": 0}
            batches = list(train)
            assert len(batches) == len(train)
            for b in batches:
                _check_batch(b, splits["train"], BS)
            ids = _ids(batches)
            assert len(set(ids)) == len(ids)
            epochs.append(ids)
            assert train.state_dict() == {"epoch": epoch, "consumed": 0}  # a finished epoch leaves nothing to skip
        per_rank.append(epochs)
    for epoch in (0, 1):  # ranks read disjoint shards
        assert not set(per_rank[0][epoch]) & set(per_rank[1][epoch])
    assert streams.class_counts == [sum(r.label == k for r in splits["train"]) for k in range(5)]


def test_set_epoch_selects_the_epoch_on_a_fresh_stream(backend, splits):
    settings, _ = backend
    a, b = (build_streams(settings, splits, 1, WORLD).train for _ in range(2))
    a.set_epoch(1)
    b.set_epoch(1)
    assert _ids(a) == _ids(b)


def test_mid_epoch_resume_position(backend, splits):
    settings, exact = backend
    reference = build_streams(settings, splits, 0, WORLD).train
    reference.set_epoch(1)
    full = _ids(reference)

    interrupted = build_streams(settings, splits, 0, WORLD).train
    interrupted.set_epoch(1)
    it = iter(interrupted)
    head = next(it).ids.tolist()
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "consumed": 1}

    resumed = build_streams(settings, splits, 0, WORLD).train
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(resumed) - 1  # the position: the batches already consumed are not read again
    assert resumed.state_dict() == {"epoch": 1, "consumed": 0}
    rest_ids = _ids(rest)
    assert len(set(rest_ids)) == len(rest_ids) and set(rest_ids) <= set(range(len(splits["train"])))
    if exact:
        assert head == full[:BS] and rest_ids == full[BS:]


def test_meta_stream_is_endless_and_resumable(backend, splits):
    settings, exact = backend
    n_meta = len(splits["meta"])
    clamped = min(META_BS, n_meta // WORLD)
    firsts = []
    for rank in range(WORLD):
        meta = build_streams(settings, splits, rank, WORLD).meta
        batches = [next(meta) for _ in range(4)]  # 1 batch per pass here: crosses three pass boundaries
        for b in batches:
            _check_batch(b, splits["meta"], clamped)
        firsts.append(set(batches[0].ids.tolist()))
        state = meta.state_dict()
        following = [next(meta).ids.tolist() for _ in range(2)]
        resumed = build_streams(settings, splits, rank, WORLD).meta
        resumed.load_state_dict(state)
        again = [next(resumed).ids.tolist() for _ in range(2)]
        assert all(len(ids) == clamped for ids in again)
        if exact:
            assert again == following
    assert not firsts[0] & firsts[1]  # the first pass: disjoint rank shards


@pytest.mark.parametrize("split", ["meta", "test"])
def test_eval_sees_every_id_exactly_once_across_ranks(backend, splits, split):
    settings, _ = backend
    n = len(splits[split])
    seen, shapes = [], []
    for streams in _ranks(settings, splits):
        stream = streams.eval[split]
        batches = list(stream)
        assert len(batches) == len(stream)
        shapes.append([tuple(b.images.shape) for b in batches])
        for b in batches:
            ids = b.ids.tolist()
            seen += ids
            # padding slots (id -1) are dropped by the trainer: their label is not part of the contract
            assert [lab for i, lab in zip(ids, b.labels.tolist()) if i >= 0] == [splits[split][i].label
                                                                                for i in ids if i >= 0]
        assert [b.ids.tolist() for b in stream] == [b.ids.tolist() for b in batches]  # finite, repeatable
    assert shapes[0] == shapes[1]  # every rank runs the same batches (gather-safe)
    assert sorted(i for i in seen if i >= 0) == list(range(n))
    # every batch is a full eval batch (one shape for a compiled model): each rank pads its ceil(n/WORLD) ids up to
    # whole batches with id -1
    assert {shape[0] for shape in shapes[0]} == {EVAL_BS}
    assert seen.count(-1) == WORLD * EVAL_BS * -(-(-(-n // WORLD)) // EVAL_BS) - n
