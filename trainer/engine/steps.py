"""One optimisation step: optional meta step (update φ), then the real step on θ.

No host-device sync happens here: every statistic is returned as a 0-dim device tensor for the logger's buffer, and a
non-finite loss or gradient skips the update *on the device* -- the fused Adam kernels read ``optimizer.found_inf``
(the hook GradScaler uses) and leave parameters, moments and step count untouched when it is non-zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.engine.accel import bare_model


@dataclass
class StepOutput:
    stats: dict[str, torch.Tensor]   # 0-dim device tensors, drained at logging intervals
    weights: torch.Tensor | None     # the real step's per-sample weights (meta runs), detached
    labels: torch.Tensor | None = None  # the batch's labels, for per-class weight histograms


def grads_finite(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads)  # one fused pass; inf/nan propagate into the norms
    return torch.isfinite(torch.stack(norms)).all()


class StepRunner:
    def __init__(self, *, model, optimizer, scheduler, loss_fn, reweighter, meta_stream, accelerator, cfg,
                 input_dtype=None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.reweighter = reweighter
        self.meta_stream = meta_stream
        self.accelerator = accelerator
        self.cfg = cfg
        self.input_dtype = input_dtype
        self.unwrapped = bare_model(accelerator, model)
        # the torch optimiser under Accelerate's wrapper: the Adam look-ahead reads its state, the skip sets found_inf
        self.raw_optimizer = getattr(optimizer, "optimizer", optimizer)
        self.device_skip = bool(getattr(self.raw_optimizer, "defaults", {}).get("fused"))
        self.consecutive_bad = torch.zeros((), dtype=torch.int64, device=accelerator.device)
        self.max_consecutive_bad = torch.zeros_like(self.consecutive_bad)
        self.bad_steps = torch.zeros_like(self.consecutive_bad)

    def restore_counters(self, *, bad_steps: int) -> None:
        """After a resume the run's bad-step total continues from the checkpoint; the consecutive count restarts at 0
        (a resumed run gets ``max_bad_steps`` fresh tries)."""
        self.bad_steps.fill_(int(bad_steps))

    def _to_device(self, batch):
        images = batch.images.to(self.accelerator.device, non_blocking=True)
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)  # DeepSpeed bf16 holds bf16 parameters: inputs must match
        return images, batch.labels.to(self.accelerator.device, non_blocking=True)

    def _meta_step(self, x, y) -> dict[str, torch.Tensor]:
        xm, ym = self._to_device(next(self.meta_stream))
        rw = self.reweighter
        # α follows the classifier's live learning rate (warm-up, cosine, step) unless meta.lookahead_lr pins it
        alpha = rw.lookahead_lr(self.scheduler.get_last_lr()[0])
        grads = rw.meta_gradient(self.unwrapped, (x, y), (xm, ym), alpha,
                                 optimizer=self.raw_optimizer, autocast=self.accelerator.autocast,
                                 grad_scaler=self.accelerator.scaler)
        rw.update(grads)
        return {"meta_loss": rw.last_meta_loss.detach().float()}

    def __call__(self, batch, step: int) -> StepOutput:
        x, y = self._to_device(batch)
        stats: dict[str, torch.Tensor] = {}
        rw = self.reweighter
        if rw is not None and rw.is_meta_step(step):
            stats.update(self._meta_step(x, y))
        buffers = [b for b in self.unwrapped.buffers() if b.is_floating_point()]
        saved = [b.clone() for b in buffers] if self.device_skip else None  # BN stats: small, restored if bad
        logits = self.model(x)  # Accelerate's prepared forward already runs under autocast
        per_sample = self.loss_fn(logits.float(), y)
        plain = per_sample.mean()
        weights = None
        if rw is not None:
            loss, weights = rw.weighted_loss(per_sample, y)
            weights = weights.detach()
            stats.update(weighted_loss=loss.detach(), w_mean=weights.mean(), w_std=weights.std(unbiased=False),
                         w_min=weights.min(), w_max=weights.max())
        else:
            loss = plain
        stats["train_loss"] = plain.detach()
        self.accelerator.backward(loss)
        if self.cfg.train.grad_clip > 0 and self.cfg.train.distributed != "deepspeed":
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        ok = torch.isfinite(loss.detach())
        if self.accelerator.scaler is None:
            # with an fp16 GradScaler, inf grads are its loss-scale calibration (it skips those steps itself);
            # only a non-finite loss is a bad step then
            ok = ok & grads_finite(self.unwrapped.parameters())
        if self.device_skip and self.accelerator.scaler is None:
            self.raw_optimizer.found_inf = (~ok).float()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if saved is not None:
            # a NaN batch has already poisoned BatchNorm's running statistics in the forward; put them back
            torch._foreach_copy_(buffers, [torch.where(ok, b, s) for b, s in zip(buffers, saved)])
        bad = (~ok).long()
        self.bad_steps += bad
        self.consecutive_bad = (self.consecutive_bad + 1) * bad
        self.max_consecutive_bad = torch.maximum(self.max_consecutive_bad, self.consecutive_bad)
        stats["bad_step"] = bad
        return StepOutput(stats=stats, weights=weights, labels=y if weights is not None else None)
