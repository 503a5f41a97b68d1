"""Evaluation over a sharded eval stream: gather across ranks, drop padding, count every image exactly once."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainer.clinical_metrics import clinical_metrics
from trainer.metrics import compute_metrics


@dataclass
class Predictions:
    ids: np.ndarray      # index into the split, sorted, unique
    labels: np.ndarray
    probs: np.ndarray    # N x K softmax probabilities

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)


@torch.no_grad()
def predict(model, stream, accelerator, num_classes: int, *, input_dtype=None, progress=None) -> Predictions:
    """Run ``stream`` through ``model`` on every rank and return the gathered, de-duplicated predictions.

    Shards may differ in length by a batch (DALI shards unevenly), so per-rank tensors are padded to a common length
    with id -1 before ``gather`` -- the same id the backends give their own padding; both are dropped here.
    """
    was_training = model.training
    model.eval()
    ids, labels, logits = [], [], []
    device = accelerator.device
    for batch in stream:
        images = batch.images.to(device, non_blocking=True)
        if input_dtype is not None:
            images = images.to(input_dtype)
        with accelerator.autocast():
            out = model(images)
        logits.append(out.float())
        labels.append(batch.labels.to(device, non_blocking=True))
        ids.append(batch.ids.to(device, non_blocking=True))
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    if logits:
        ids_t, labels_t, logits_t = torch.cat(ids), torch.cat(labels), torch.cat(logits)
    else:  # a rank whose shard is empty still has to take part in the collectives
        ids_t = torch.empty(0, dtype=torch.int64, device=device)
        labels_t = torch.empty(0, dtype=torch.int64, device=device)
        logits_t = torch.empty(0, num_classes, device=device)
    if accelerator.num_processes > 1:
        ids_t = accelerator.pad_across_processes(ids_t, dim=0, pad_index=-1)
        labels_t = accelerator.pad_across_processes(labels_t, dim=0, pad_index=0)
        logits_t = accelerator.pad_across_processes(logits_t, dim=0, pad_index=0)
        ids_t, labels_t, logits_t = accelerator.gather((ids_t, labels_t, logits_t))
    ids_np = ids_t.cpu().numpy()
    keep = ids_np >= 0
    ids_np = ids_np[keep]
    order = np.argsort(ids_np, kind="stable")
    ids_np = ids_np[order]
    # the same image can arrive twice only through padding that re-used a real id; keep the first
    uniq = np.concatenate([[True], ids_np[1:] != ids_np[:-1]]) if len(ids_np) else np.zeros(0, bool)
    probs = torch.softmax(logits_t, dim=1).cpu().numpy()[keep][order][uniq]
    return Predictions(ids=ids_np[uniq], labels=labels_t.cpu().numpy()[keep][order][uniq], probs=probs)


def evaluate(model, stream, accelerator, num_classes: int, *, referable_from: int | None = None,
             **kwargs) -> tuple[dict, Predictions]:
    pred = predict(model, stream, accelerator, num_classes, **kwargs)
    metrics = compute_metrics(pred.labels, pred.preds, num_classes)
    if len(pred.labels):
        metrics.update(clinical_metrics(pred.labels, pred.probs, num_classes, referable_from))
    if len(pred.labels):
        nll = F.nll_loss(torch.log(torch.from_numpy(pred.probs).clamp_min(1e-12)),
                         torch.from_numpy(pred.labels))
        metrics["loss"] = float(nll)
    return metrics, pred
