"""TBLogger writes the documented tags (read back from the event files) and DeviceScalarBuffer defers host syncs."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_pipeline.records import class_names
from common.normalization import IMAGENET_MEAN, IMAGENET_STD
from trainer.metrics import compute_metrics
from trainer.observability.tb_logging import DeviceScalarBuffer, TBLogger

NAMES = class_names(5)
TRAINER_SCALARS = ("train/loss", "train/weighted_loss", "meta/loss", "meta/weight_mean", "meta/weight_std",
                   "meta/weight_min", "meta/weight_max", "lr/classifier", "lr/meta", "perf/img_per_s",
                   "perf/data_wait_frac", "perf/gpu_mem_gib", "faults/bad_steps")


def _read(log_dir) -> EventAccumulator:
    # 0 = keep every event (the default keeps only a few images/histograms per tag)
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


def _metrics(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, 120)
    p = np.where(rng.random(120) < 0.6, y, rng.integers(0, 5, 120))
    m = compute_metrics(y, p, 5)
    m["loss"] = 0.8123
    return m


def test_scalars_have_one_event_per_step_with_values(tmp_path):
    n = 7
    with TBLogger(tmp_path / "tb", enabled=True, class_names=NAMES) as tb:
        for step in range(1, n + 1):
            tb.scalars(step, {tag: step * 0.5 + i for i, tag in enumerate(TRAINER_SCALARS)})
    ea = _read(tmp_path / "tb")
    assert set(TRAINER_SCALARS) <= set(ea.Tags()["scalars"])
    for i, tag in enumerate(TRAINER_SCALARS):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == list(range(1, n + 1))
        np.testing.assert_allclose([e.value for e in events], [s * 0.5 + i for s in range(1, n + 1)], rtol=1e-6)


def test_none_scalars_are_skipped(tmp_path):
    with TBLogger(tmp_path, enabled=True, class_names=NAMES) as tb:
        tb.scalars(1, {"train/loss": 1.25, "meta/loss": None})
    tags = _read(tmp_path).Tags()["scalars"]
    assert "train/loss" in tags and "meta/loss" not in tags


def test_eval_metrics_writes_headline_per_class_and_confusion(tmp_path):
    m = _metrics()
    with TBLogger(tmp_path, enabled=True, class_names=NAMES) as tb:
        tb.eval_metrics("val", m, step=40)
        tb.eval_metrics("val", m, step=80)
    ea = _read(tmp_path)
    expected = {"val/accuracy": m["accuracy"], "val/macro_f1": m["macro_f1"], "val/weighted_f1": m["weighted_f1"],
                "val/qwk": m["qwk"], "val/loss": m["loss"]}
    expected |= {f"val/recall/{n}": r for n, r in zip(NAMES, m["per_class_recall"])}
    expected |= {f"val/f1/{n}": f for n, f in zip(NAMES, m["per_class_f1"])}
    assert "val/recall/3_severe" in ea.Tags()["scalars"]
    for tag, value in expected.items():
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [40, 80], tag
        assert events[0].value == pytest.approx(value, rel=1e-6), tag
    images = ea.Images("val/confusion")
    assert [e.step for e in images] == [40, 80]
    img = Image.open(io.BytesIO(images[0].encoded_image_string))
    assert img.mode == "RGB" and img.width > 200 and img.height > 200
    # not a blank canvas: the matrix and its annotations are drawn
    assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 20


def test_eval_metrics_without_loss_and_bad_lengths(tmp_path):
    m = _metrics()
    del m["loss"]
    with TBLogger(tmp_path, enabled=True, class_names=NAMES) as tb:
        tb.eval_metrics("test", m, step=1)
        with pytest.raises(ValueError, match="per_class_recall has 4 values"):
            tb.eval_metrics("test", {**m, "per_class_recall": m["per_class_recall"][:4]}, step=2)
        with pytest.raises(ValueError, match="qwk"):
            tb.eval_metrics("test", {k: v for k, v in m.items() if k != "qwk"}, step=3)
    tags = _read(tmp_path).Tags()["scalars"]
    assert "test/accuracy" in tags and "test/loss" not in tags


def test_histograms_from_numpy_and_torch(tmp_path):
    w = torch.linspace(0.0, 2.0, 64, requires_grad=True) * 1.0  # non-leaf with grad: must be detached
    with TBLogger(tmp_path, enabled=True, class_names=NAMES) as tb:
        tb.histogram("meta/weights", w, step=10)
        tb.histogram("meta/weights", np.ones(5), step=20)
        tb.histogram("meta/class_weights/3_severe", np.array([0.5, 1.5, 2.5]), step=10)
        tb.histogram("meta/empty", np.array([]), step=10)  # skipped, tensorboard cannot store it
    ea = _read(tmp_path)
    assert set(ea.Tags()["histograms"]) == {"meta/weights", "meta/class_weights/3_severe"}
    events = ea.Histograms("meta/weights")
    assert [e.step for e in events] == [10, 20]
    assert events[0].histogram_value.num == 64
    assert events[0].histogram_value.min == pytest.approx(0.0) and events[0].histogram_value.max == pytest.approx(2.0)
    assert ea.Histograms("meta/class_weights/3_severe")[0].histogram_value.sum == pytest.approx(4.5)


def test_image_grid_denormalises_clamps_and_caps_at_32(tmp_path):
    h = w = 6
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixel = torch.full((40, 3, h, w), 0.25)
    pixel[:, :, : h // 2] = 1.7  # out of range after de-normalising: must clamp to white
    normalised = ((pixel - mean) / std).contiguous(memory_format=torch.channels_last)
    with TBLogger(tmp_path, enabled=True, class_names=NAMES) as tb:
        tb.image_grid("train/images", normalised, step=3)
        with pytest.raises(ValueError, match="N x 3 x H x W"):
            tb.image_grid("train/images", torch.zeros(2, 1, h, w), step=4)
    (event,) = _read(tmp_path).Images("train/images")
    assert event.step == 3
    # 32 images in rows of 8 with 2-px padding -> 4 x 8 tiles
    assert (event.width, event.height) == (8 * (w + 2) + 2, 4 * (h + 2) + 2)
    grid = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    tile = grid[2: 2 + h, 2: 2 + w]  # first image, inside the padding
    assert (tile[: h // 2] == 255).all()
    assert np.abs(tile[h // 2:].astype(int) - round(0.25 * 255)).max() <= 1


def test_text_is_fenced_and_keeps_indentation(tmp_path):
    yaml_text = "model:\n  arch: resnet50\n  num_classes: 5\n"
    with TBLogger(tmp_path, enabled=True, class_names=NAMES) as tb:
        tb.text("config", yaml_text)
        tb.text("notes", "has ``` inside", step=2)
    ea = _read(tmp_path)
    (event,) = ea.Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert text == "```\n" + yaml_text + "\n```"
    notes = ea.Tensors("notes/text_summary")[0].tensor_proto.string_val[0].decode()
    assert notes.startswith("````\n") and notes.endswith("\n````")


def test_disabled_logger_creates_nothing(tmp_path):
    log_dir = tmp_path / "rank1" / "tb"
    tb = TBLogger(log_dir, enabled=False, class_names=NAMES)
    tb.scalars(1, {"train/loss": 1.0})
    tb.histogram("meta/weights", np.ones(3), 1)
    tb.eval_metrics("val", _metrics(), 1)
    tb.image_grid("train/images", torch.zeros(2, 3, 4, 4), 1)
    tb.text("config", "a: 1")
    tb.flush()
    tb.close()
    assert not tb.active
    assert not (tmp_path / "rank1").exists()


def test_logging_after_close_is_a_no_op(tmp_path):
    tb = TBLogger(tmp_path, enabled=True, class_names=NAMES)
    tb.scalars(1, {"train/loss": 1.0})
    tb.close()
    tb.scalars(2, {"train/loss": 2.0})
    tb.close()
    assert [e.step for e in _read(tmp_path).Scalars("train/loss")] == [1]


# ------------------------------------------------------------------------------------------- DeviceScalarBuffer


def test_buffer_drain_returns_values_in_order_and_clears():
    buf = DeviceScalarBuffer()
    x = torch.tensor(3.0, requires_grad=True)
    for i in range(5):
        buf.add("train/loss", x * i)  # has a grad_fn: the buffer must not keep the graph alive
        buf.add("meta/loss", torch.tensor(10.0 - i))
    buf.add("train/loss", 0.5)  # a python number mixed in keeps its position
    assert len(buf) == 11
    assert all(not v.requires_grad for v in buf._values["train/loss"][:5])
    out = buf.drain()
    assert out == {"train/loss": [0.0, 3.0, 6.0, 9.0, 12.0, 0.5], "meta/loss": [10.0, 9.0, 8.0, 7.0, 6.0]}
    assert len(buf) == 0 and buf.drain() == {}


def test_buffer_promotes_mixed_dtypes_and_rejects_non_scalars():
    buf = DeviceScalarBuffer()
    buf.add("w", torch.tensor(1.5, dtype=torch.bfloat16))
    buf.add("w", torch.tensor([2.25], dtype=torch.float32))  # one element: accepted
    buf.add("n", torch.tensor(7))
    assert buf.drain() == {"w": [1.5, 2.25], "n": [7.0]}
    with pytest.raises(ValueError, match="'w'.*shape \\(2,\\)"):
        buf.add("w", torch.ones(2))
    with pytest.raises(TypeError, match="'w'"):
        buf.add("w", "1.0")


def test_buffer_add_never_syncs_and_drain_syncs_once(monkeypatch):
    buf = DeviceScalarBuffer()

    def forbidden(*a, **k):
        raise AssertionError("host sync in DeviceScalarBuffer.add")

    with monkeypatch.context() as m:
        for name in ("item", "cpu", "tolist", "numpy", "__float__"):
            m.setattr(torch.Tensor, name, forbidden)
        for i in range(10):
            buf.add("a", torch.tensor(float(i)))
            buf.add("b", torch.tensor(float(-i)))
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        calls.append(tuple(self.shape))
        return real_cpu(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    out = buf.drain()
    assert out["a"] == [float(i) for i in range(10)] and out["b"] == [float(-i) for i in range(10)]
    assert calls == [(20,)]  # one transfer for every name and value of the interval


def test_buffer_drain_applies_the_reduction_once_before_the_copy():
    buf = DeviceScalarBuffer()
    for v in (1.0, 2.0, 3.0):
        buf.add("loss", torch.tensor(v))
    buf.add("w", torch.tensor(0.5))
    calls = []

    def fake_all_reduce_mean(stacked):  # what the trainer passes: one collective over the stacked values
        calls.append(tuple(stacked.shape))
        return stacked * 10

    buf.add("loss", 0.25)  # a host number is neither reduced nor copied
    out = buf.drain(reduce=fake_all_reduce_mean)
    assert out == {"loss": [10.0, 20.0, 30.0, 0.25], "w": [5.0]}
    assert calls == [(4,)]  # one collective for every name
