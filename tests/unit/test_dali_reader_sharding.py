"""DALI reader-sharded streams (`data.dali_sharding: reader`, the default): shards, epochs, resume, meta."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvidia.dali")

from data_pipeline.backends.dali.streams import DaliReaderMetaStream, DaliReaderTrainStream  # noqa: E402
from data_pipeline.backends.dali.pipelines import AugmentSpec, explain_failure, shard_sizes  # noqa: E402
from data_pipeline.records import DataError, Record  # noqa: E402
from tests.support.dali_fixtures import S, _spec  # noqa: E402


def _ids(batches) -> list[int]:
    return [i for b in batches for i in b.ids.tolist()]


@pytest.mark.parametrize("n,bs", [(23, 3), (21, 5)])
def test_reader_train_epochs_are_disjoint_shards_of_equal_length_from_one_pipeline(records, n, bs):
    """(23, 3): shards 11/12, 3 steps each, a pass is 4 batches (the last one padded with a repeated image).
    (21, 5): shards 10/11, bs divides the smaller one -- the case DALI's own DROP policy gets wrong. An epoch that
    started inside the previous pass would repeat the padding image or overlap the previous epoch's tail."""
    recs, world = records[:n], 2
    steps = min(shard_sizes(n, world)) // bs
    epochs = {}
    for rank in range(world):
        stream = DaliReaderTrainStream(recs, _spec(bs, AugmentSpec()), rank, world, 7)
        assert len(stream) == steps  # the same on every rank although the shards differ
        run = None
        for epoch in range(3):
            stream.set_epoch(epoch)
            batches = list(stream)
            assert len(batches) == steps
            for b in batches:
                assert b.images.shape == (bs, 3, S, S) and b.labels.dtype == torch.int64
                assert b.labels.tolist() == [recs[i].label for i in b.ids.tolist()]
            ids = _ids(batches)
            assert len(set(ids)) == len(ids) == steps * bs and set(ids) <= set(range(n))
            epochs[rank, epoch] = ids
            run = run or stream._run
            assert stream._run is run  # built once: the reader reshuffles each pass, no rebuild per epoch
    for epoch in range(3):  # one epoch: disjoint ranks covering the split minus the dropped remainder
        union = set(epochs[0, epoch]) | set(epochs[1, epoch])
        assert len(union) == world * steps * bs and not set(epochs[0, epoch]) & set(epochs[1, epoch])
    assert epochs[0, 0] != epochs[0, 1] and epochs[1, 1] != epochs[1, 2]  # every pass is reshuffled
    shards = [set().union(*(epochs[rank, e] for e in range(3))) for rank in range(world)]
    assert not shards[0] & shards[1]  # stick_to_shard: a rank never reads another rank's images
    assert all(len(shards[r]) <= shard_sizes(n, world)[r] for r in range(world))


def test_reader_train_seed_decides_the_shards(records):
    def shard(seed):
        stream = DaliReaderTrainStream(records, _spec(11), 0, 2, seed)
        return set(_ids(stream))  # shard 0 has 11 images: one batch of 11 is all of it

    assert shard(1) == shard(1) and shard(1) != shard(2)


def test_reader_train_resume_mid_epoch_and_abandoned_epoch(records):
    n, bs = len(records), 2
    stream = DaliReaderTrainStream(records, _spec(bs), 0, 1, 5)
    steps = len(stream)
    assert steps == n // bs
    it = iter(stream)
    next(it), next(it)
    del it                                   # abandoned after 2 steps: the next epoch is a whole fresh pass
    stream.set_epoch(1)
    it = iter(stream)
    head = [next(it).ids.tolist() for _ in range(4)]
    state = stream.state_dict()
    assert state == {"epoch": 1, "consumed": 4}
    rest = [b.ids.tolist() for b in it]
    assert len(set(sum(head + rest, []))) == steps * bs
    resumed = [DaliReaderTrainStream(records, _spec(bs), 0, 1, 5) for _ in range(2)]
    tails = []
    for r in resumed:
        r.load_state_dict(state)
        tail = [b.ids.tolist() for b in r]
        assert len(tail) == steps - 4 and len(set(sum(tail, []))) == (steps - 4) * bs
        assert r.state_dict() == {"epoch": 1, "consumed": 0}
        tails.append(tail)
    assert tails[0] == tails[1]  # DALI's seeded order: a resume is reproducible (not the uninterrupted order)
    run = resumed[0]._run
    resumed[0].set_epoch(2)
    assert len(set(_ids(resumed[0]))) == steps * bs and resumed[0]._run is run


def test_reader_meta_is_endless_and_every_pass_covers_the_shard(records):
    n, bs, world = len(records), 4, 2
    shards = []
    for rank in range(world):
        meta = DaliReaderMetaStream(records, _spec(bs), rank, world, 11)
        m = shard_sizes(n, world)[rank]
        batches = [next(meta) for _ in range(-(-5 * m // bs))]  # 5 passes and a bit; never StopIteration
        assert all(b.labels.tolist() == [records[i].label for i in b.ids.tolist()] for b in batches)
        ids = _ids(batches)
        passes = [ids[p * m:(p + 1) * m] for p in range(5)]
        shard = set(passes[0])
        assert len(shard) == m and all(len(set(p)) == m and set(p) == shard for p in passes)
        assert len({tuple(p) for p in passes}) > 1  # reshuffled
        assert meta.state_dict() == {"epoch": len(ids) // m, "consumed": (len(ids) % m) // bs}
        run = meta._run
        next(meta)
        assert meta._run is run  # one pipeline for the whole run
        shards.append(shard)
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(n))  # nothing dropped in meta


def test_reader_meta_resume_and_tiny_shard(records):
    meta = DaliReaderMetaStream(records, _spec(4), 0, 1, 2)
    for _ in range(8):
        next(meta)
    state = meta.state_dict()
    assert state == {"epoch": 1, "consumed": (32 - 23) // 4}
    again = DaliReaderMetaStream(records, _spec(4), 0, 1, 2)
    again.load_state_dict(state)
    assert again.state_dict() == state
    for _ in range(3):
        assert set(next(again).ids.tolist()) <= set(range(23))
    assert again.state_dict() == {"epoch": 1, "consumed": state["consumed"] + 3}
    tiny = DaliReaderMetaStream(records[:5], _spec(8), 1, 2, 0)  # shards 2 and 3, batch 8 -> batches of 2
    assert [next(tiny).images.shape[0] for _ in range(4)] == [2] * 4
    with pytest.raises(DataError, match="meta split has 1 images"):
        DaliReaderMetaStream(records[:1], _spec(8), 0, 2, 0)


def test_reader_unreadable_image_is_named(records, tmp_path):
    bad = tmp_path / "broken.jpg"
    good = records[0].path
    with open(good, "rb") as f:
        bad.write_bytes(f.read()[:300])  # a truncated JPEG: the header parses, decoding fails
    recs = records[:7] + [Record(str(bad), 0, "broken")]
    stream = DaliReaderTrainStream(recs, _spec(2), 0, 1, 0)
    for _ in range(2):  # the failed pipeline is replaced: the second try names the same file
        with pytest.raises(DataError, match="broken.jpg"):
            list(stream)
    meta = DaliReaderMetaStream(recs, _spec(2), 0, 1, 0)
    with pytest.raises(DataError, match="broken.jpg"):
        for _ in range(5):  # a pass is 4 batches
            next(meta)


def test_explain_failure_scans_the_list_when_dali_names_no_file(records, tmp_path):
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    files = [r.path for r in records[:4]] + [str(bad)]
    err = explain_failure(RuntimeError("Critical error in pipeline"), "what", files, None)
    assert isinstance(err, DataError) and "empty.jpg" in str(err) and "metaloss prepare" in str(err)
    err = explain_failure(RuntimeError("boom"), "what", files[:4], None)
    assert type(err) is RuntimeError and "boom" in str(err)
