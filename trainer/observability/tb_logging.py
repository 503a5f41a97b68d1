"""TensorBoard logging for the trainer, plus a buffer that keeps per-step scalars on the device until a log interval.

Tags the trainer writes (keep this list in sync with ``trainer/`` and the README):

Scalars (``TBLogger.scalars``)
    train/loss            plain (unweighted) mean cross-entropy of the training batch
    train/weighted_loss   the loss θ actually stepped on, Σ w_i ℓ_i / N
    meta/loss             meta-validation loss at the look-ahead parameters θ'
    meta/weight_mean, meta/weight_std, meta/weight_min, meta/weight_max   statistics of the meta-net's weights
    lr/classifier, lr/meta                                               current learning rates
    perf/img_per_s        training throughput (all ranks)
    perf/data_wait_frac   fraction of the interval's wall time the device sat idle between training steps
                          (GPU: CUDA events; CPU: time blocked on the train stream)
    perf/gpu_mem_gib      peak allocated accelerator memory
    faults/bad_steps      steps skipped because of a non-finite loss or gradient (cumulative)

Histograms (``TBLogger.histogram``)
    meta/weights                     all weights the meta-net produced since the previous log interval
    meta/class_weights/<class name>  per-class weights (class granularity), e.g. ``meta/class_weights/3_severe``

Evaluation (``TBLogger.eval_metrics``, split = "val" or "test")
    {split}/accuracy, {split}/macro_f1, {split}/weighted_f1, {split}/qwk, {split}/loss (when present),
    {split}/recall/<class name>, {split}/f1/<class name>, and the image {split}/confusion (rows = truth);
    clinical (trainer/clinical_metrics.py): {split}/referable/{sensitivity,specificity,auc,sens_at_spec90,
    sens_at_spec95}, {split}/auc/<class name>, {split}/auc_macro, {split}/ece

Images / text: ``train/images`` (a de-normalised grid of a training batch), ``config`` (resolved YAML).

Only the main process logs: other ranks build ``TBLogger(..., enabled=False)``, whose methods do nothing and which
never creates a directory or an event file.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from common.normalization import IMAGENET_MEAN, IMAGENET_STD

from trainer.clinical_metrics import tensorboard_scalars as clinical_scalars
from trainer.reporting.figures import confusion_image

_MAX_GRID_IMAGES = 32
_EVAL_SCALARS = ("accuracy", "macro_f1", "weighted_f1", "qwk")


class TBLogger:
    def __init__(self, log_dir, *, enabled: bool, class_names: Sequence[str], purge_step: int | None = None):
        """``purge_step``: on resume, the first step trained again; TensorBoard hides every event an earlier
        attempt wrote at that step or later, so a step logged before the crash and again after it shows once."""
        self.class_names = list(class_names)
        self.enabled = bool(enabled)
        self._writer = None
        if self.enabled:
            # Imported lazily so disabled ranks never load the tensorboard package.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(log_dir)), purge_step=purge_step)

    # A closed or disabled logger is a no-op rather than an error: shutdown paths may log after close().
    @property
    def active(self) -> bool:
        return self._writer is not None

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Write ``tag -> value``; ``None`` values (e.g. meta/loss in a baseline run) are skipped."""
        if not self.active:
            return
        for tag, value in values.items():
            if value is None:
                continue
            self._writer.add_scalar(tag, float(value), int(step))

    def histogram(self, tag: str, values, step: int) -> None:
        if not self.active:
            return
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().to(torch.float64).numpy()
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:  # tensorboard refuses empty histograms; nothing to show anyway
            return
        self._writer.add_histogram(tag, values, int(step))

    def eval_metrics(self, split: str, metrics: Mapping[str, Any], step: int) -> None:
        """Headline metrics, per-class recall/F1 and the confusion image from a ``compute_metrics`` dict."""
        if not self.active:
            return
        missing = [k for k in (*_EVAL_SCALARS, "per_class_recall", "per_class_f1", "confusion") if k not in metrics]
        if missing:
            raise ValueError(f"eval_metrics({split!r}): metrics dict lacks key(s) {missing}")
        values = {f"{split}/{k}": metrics[k] for k in _EVAL_SCALARS}
        if metrics.get("loss") is not None:
            values[f"{split}/loss"] = metrics["loss"]
        for key, short in (("per_class_recall", "recall"), ("per_class_f1", "f1")):
            per_class = list(metrics[key])
            if len(per_class) != len(self.class_names):
                raise ValueError(f"eval_metrics({split!r}): {key} has {len(per_class)} values for "
                                 f"{len(self.class_names)} classes {self.class_names}")
            values.update({f"{split}/{short}/{name}": v for name, v in zip(self.class_names, per_class)})
        values.update(clinical_scalars(split, metrics, self.class_names))
        self.scalars(step, values)
        image = confusion_image(metrics["confusion"], self.class_names, title=f"{split} confusion (rows = truth)")
        self._writer.add_image(f"{split}/confusion", image, int(step), dataformats="HWC")

    def image_grid(self, tag: str, images, step: int) -> None:
        """Up to 32 ImageNet-normalised N x 3 x H x W images, de-normalised to [0, 1], as one grid image."""
        if not self.active:
            return
        from torchvision.utils import make_grid

        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"image_grid({tag!r}): expected an N x 3 x H x W tensor, got {shape}")
        x = images[:_MAX_GRID_IMAGES].detach().to("cpu", torch.float32).contiguous()
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x * std + mean).clamp_(0.0, 1.0)
        self._writer.add_image(tag, make_grid(x, nrow=8, padding=2), int(step))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        """Text shown verbatim: wrapped in a Markdown code fence so TensorBoard keeps YAML indentation."""
        if not self.active:
            return
        fence = "```"
        while fence in text:  # a fence longer than any run of backticks inside cannot be closed early
            fence += "`"
        self._writer.add_text(tag, f"{fence}\n{text}\n{fence}", int(step))

    def flush(self) -> None:
        if self.active:
            self._writer.flush()

    def close(self) -> None:
        if self.active:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TBLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceScalarBuffer:
    """Collects per-step scalars without a host-device sync per step.

    ``add`` keeps a detached reference to the 0-dim device tensor (no copy, no ``.item()``); ``drain``, called at a
    logging interval, does one ``torch.stack(...).cpu()`` for all names and returns python floats in insertion order.
    Python numbers are accepted too (kept as-is) so callers need not special-case values already on the host.
    """

    def __init__(self) -> None:
        self._values: dict[str, list] = {}

    def add(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"DeviceScalarBuffer.add({name!r}): expected a scalar tensor, "
                                 f"got shape {tuple(value.shape)}")
            value = value.detach().reshape(())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
        else:
            raise TypeError(f"DeviceScalarBuffer.add({name!r}): expected a 0-dim tensor or a real number, "
                            f"got {type(value).__name__}")
        self._values.setdefault(name, []).append(value)

    def __len__(self) -> int:
        """Number of values waiting to be drained (all names)."""
        return sum(len(v) for v in self._values.values())

    def drain(self, reduce=None) -> dict[str, list[float]]:
        """Every buffered tensor of every name goes into ONE flat device vector: ``reduce`` (the trainer passes a
        mean all-reduce across ranks) runs once on it, and one ``.cpu()`` brings it to the host -- one collective
        and one device->host copy per logging interval, whatever the number of names. Ranks must add the same names
        in the same order (they do: every rank runs the same steps with the same config)."""
        slots = [(name, i) for name, entries in self._values.items()
                 for i, v in enumerate(entries) if isinstance(v, torch.Tensor)]
        out = {name: list(entries) for name, entries in self._values.items()}
        if slots:
            # one dtype for the whole vector: at least float32 (integer counters average), float64 when present
            dtype = torch.float32
            for name, i in slots:
                dtype = torch.promote_types(dtype, self._values[name][i].dtype)
            flat = torch.stack([self._values[name][i].to(dtype) for name, i in slots])
            if reduce is not None:
                flat = reduce(flat)
            for (name, i), v in zip(slots, flat.cpu().to(torch.float64).tolist()):
                out[name][i] = v
        self._values = {}
        return {name: [float(v) for v in vals] for name, vals in out.items()}
