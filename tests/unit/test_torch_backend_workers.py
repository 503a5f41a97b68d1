"""torch backend: DataLoader workers live across passes of the endless meta stream (and epochs of the train
stream), and eval batches are padded to one fixed size with id -1."""
from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.backends.synthetic import build_synthetic_streams
from data_pipeline.backends.torch_backend import build_torch_streams
from data_pipeline.readers import read_dataset
from data_pipeline.settings import DataSettings
from trainer.config import config_from_dict


def _children() -> set[int]:
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").glob("*"):
        try:
            pids |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            pass
    return pids


def _cfg(workers: int, **extra) -> DataSettings:
    return DataSettings.from_config(config_from_dict({
        "data": {"image_size": 16, "num_workers": workers, **extra.pop("data", {})},
        "train": {"batch_size": 4, "eval_batch_size": 5, "cpu": True}, **extra}))


def _splits(synth_dir, n_meta: int):
    records = read_dataset("aptos", synth_dir)
    return {"train": records[:24], "meta": records[24:24 + n_meta], "test": records[40:53]}


def test_meta_stream_keeps_its_workers_across_passes(synth_dir):
    streams = build_torch_streams(_cfg(2), _splits(synth_dir, 8), 0, 1)  # 2 batches per pass
    before = _children()
    seen_workers = []
    for p in range(4):
        for _ in range(2):
            next(streams.meta)
        seen_workers.append(_children() - before)
        assert streams.meta.state_dict()["epoch"] == p  # pass p read (the next batch starts pass p + 1)
    assert len(seen_workers[0]) == 2
    assert all(w == seen_workers[0] for w in seen_workers)  # 4 passes, the same 2 worker processes


def test_train_stream_keeps_workers_across_epochs_and_resumes_exactly(synth_dir):
    cfg = _cfg(2)
    splits = _splits(synth_dir, 8)
    streams = build_torch_streams(cfg, splits, 0, 1)
    before = _children()
    epochs, workers = [], []
    for e in range(3):
        streams.train.set_epoch(e)
        epochs.append([b.images.clone() for b in streams.train])
        workers.append(_children() - before)
    assert workers[0] and workers == [workers[0]] * 3
    # a fresh stream (no workers yet) resumed at epoch 1, batch 2 yields exactly the same pixels
    fresh = build_torch_streams(cfg, splits, 0, 1)
    fresh.train.load_state_dict({"epoch": 1, "consumed": 2})
    resumed = [b.images for b in fresh.train]
    assert len(resumed) == len(epochs[1]) - 2
    assert all((a == b).all() for a, b in zip(resumed, epochs[1][2:]))


def test_eval_batches_are_full_and_padding_has_id_minus_one(synth_dir):
    splits = _splits(synth_dir, 8)  # test split: 13 images, eval batch 5 -> 5, 5, 3 real + 2 padding
    for streams in (build_torch_streams(_cfg(0), splits, 0, 1),
                    build_synthetic_streams(_cfg(0, data={"backend": "synthetic"}), splits, 0, 1)):
        batches = list(streams.eval["test"])
        assert [b.images.shape[0] for b in batches] == [5, 5, 5]
        ids = [int(i) for b in batches for i in b.ids]
        assert sorted(i for i in ids if i >= 0) == list(range(13)) and ids[-2:] == [-1, -1]
