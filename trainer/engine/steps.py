"""One optimisation step: optional meta step (update φ), then the real step on θ.

Shared forward (``meta.share_forward``, ``exact``/``head``; DESIGN.md "One forward per step"): the real step's
forward of the train batch runs first, through the DDP wrapper, and updates BatchNorm's running statistics (once).
The meta step takes the virtual gradient from that graph with ``autograd.grad(retain_graph=True)`` -- which runs no
DDP reducer hook, so it stays rank-local -- updates φ, and the real weighted loss (new φ, weights constant) is then
back-propagated through the same graph, where DDP all-reduces as usual. ``head`` takes the train batch's fc input
from that forward instead. Without sharing (``second_order``, DeepSpeed, ``share_forward: false``) the meta step
runs its own forward before the real one, on the unwrapped module.

No host-device sync happens here: every statistic is returned as a 0-dim device tensor for the logger's buffer, and a
non-finite loss or gradient skips the update *on the device* -- the fused Adam kernels read ``optimizer.found_inf``
(the hook GradScaler uses) and leave parameters, moments and step count untouched when it is non-zero.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trainer.components.models import classifier_layer
from trainer.engine.accel import bare_model
from trainer.meta.head import captured_fc_input
from trainer.meta.randomness import RngSnapshot
from trainer.meta.tangents import ActivationRecorder, supports_saved_tangents


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
        # How the meta step runs (DESIGN.md "One forward per step"). The two-forward path stays for second_order
        # (the oracle), DeepSpeed (its engine has not been verified with a graph autograd.grad already walked),
        # model.compile (AOTAutograd's compiled backward donates its buffers and refuses the retain_graph=True the
        # shared virtual gradient needs), and meta.precision=fp32 under a low-precision run (own fp32 forward).
        self.meta_fp32 = reweighter is not None and reweighter.cfg.precision == "fp32"
        self.share_forward = (reweighter is not None and reweighter.shares_forward()
                              and cfg.train.distributed != "deepspeed" and not cfg.model.compile
                              and not (self.meta_fp32 and cfg.train.precision != "fp32"))
        # meta.real_step=lagged: the real gradient IS the look-ahead's virtual gradient (weights of φ before its
        # update, detached features): no real backward on meta steps; under DDP it is all-reduced here
        self.lagged = reweighter is not None and reweighter.cfg.real_step == "lagged"
        self.share_forward = self.share_forward or self.lagged
        # exact + batch granularity + detached features: the real gradient is w_new·∇θ mean(ℓ), which the shared
        # meta step has already computed; no real backward either (exact, not lagged). Not with a GradScaler.
        self.rescale = (self.share_forward and not self.lagged and reweighter.rescales_mean_gradient()
                        and accelerator.scaler is None)
        # exact's directional derivatives from the shared forward's activations (not under torch.compile: hooks on
        # every leaf module would break its graph)
        self.record = (self.share_forward and not self.rescale and reweighter.cfg.lookahead == "exact"
                       and reweighter.cfg.directional == "forward_ad" and reweighter.cfg.reuse_activations
                       and not (reweighter.cfg.granularity == "batch" and reweighter.cfg.detach_features)
                       and not cfg.model.compile and supports_saved_tangents(self.unwrapped))
        self.head_fc = (classifier_layer(self.unwrapped)
                        if self.share_forward and reweighter.cfg.lookahead == "head" else None)

    def restore_counters(self, *, bad_steps: int) -> None:
        """After a resume the run's bad-step total continues from the checkpoint; the consecutive count restarts at 0
        (a resumed run gets ``max_bad_steps`` fresh tries)."""
        self.bad_steps.fill_(int(bad_steps))

    def _to_device(self, batch):
        images = batch.images.to(self.accelerator.device, non_blocking=True)
        if self.input_dtype is not None:
            images = images.to(self.input_dtype)  # DeepSpeed bf16 holds bf16 parameters: inputs must match
        return images, batch.labels.to(self.accelerator.device, non_blocking=True)

    def _set_real_gradient(self, grads) -> None:
        """.grad = the rank-local virtual gradient, averaged over ranks (what DDP's backward would have done)."""
        params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= torch.distributed.get_world_size()
            grads = torch.split(flat, [p.numel() for p in params])
        for p, g in zip(params, grads, strict=True):
            p.grad = g.view_as(p)

    def _meta_step(self, x, y, train_losses=None, train_features=None, virtual_out=None,
                   mean_grad_out=None, saved=None, rng=None) -> dict[str, torch.Tensor]:
        xm, ym = self._to_device(next(self.meta_stream))
        rw = self.reweighter
        # α follows the classifier's live learning rate (warm-up, cosine, step) unless meta.lookahead_lr pins it
        alpha = rw.lookahead_lr(self.scheduler.get_last_lr()[0])
        grads = rw.meta_gradient(self.unwrapped, (x, y), (xm, ym), alpha,
                                 optimizer=self.raw_optimizer,
                                 autocast=None if self.meta_fp32 else self.accelerator.autocast,
                                 grad_scaler=None if self.meta_fp32 else self.accelerator.scaler,
                                 train_losses=train_losses,
                                 train_features=train_features, virtual_out=virtual_out,
                                 mean_grad_out=mean_grad_out, saved_activations=saved, rng=rng)
        rw.update(grads)
        return {"meta_loss": rw.last_meta_loss.detach().float()}

    def __call__(self, batch, step: int) -> StepOutput:
        x, y = self._to_device(batch)
        stats: dict[str, torch.Tensor] = {}
        rw = self.reweighter
        meta_now = rw is not None and rw.is_meta_step(step)
        shared = meta_now and self.share_forward
        if meta_now and not shared:
            stats.update(self._meta_step(x, y))
        buffers = [b for b in self.unwrapped.buffers() if b.is_floating_point()]
        saved = [b.clone() for b in buffers] if self.device_skip else None  # BN stats: small, restored if bad
        capture = shared and self.head_fc is not None
        recorder = ActivationRecorder(self.unwrapped) if shared and self.record else None
        # exact replays this forward's dropout / stochastic-depth draws in its directional pass
        rng = RngSnapshot(x.device) if shared and not capture else None
        with captured_fc_input(self.head_fc) if capture else contextlib.nullcontext() as seen, \
                recorder if recorder is not None else contextlib.nullcontext():
            logits = self.model(x)  # Accelerate's prepared forward already runs under autocast
        # half-precision logits are upcast; float64 ones (tests) stay float64 -- the shared meta step differentiates
        # these very losses, and the two-forward path computes them in the model's precision
        per_sample = self.loss_fn(logits if logits.dtype in (torch.float32, torch.float64) else logits.float(), y)
        virtual = [] if shared and self.lagged else None
        mean_grad = [] if shared and self.rescale else None
        weights = None
        if rw is not None and virtual is not None:
            loss, weights = rw.weighted_loss(per_sample, y)  # φ before the meta update: what the virtual step used
        if shared:
            stats.update(self._meta_step(x, y, train_losses=None if capture else per_sample,
                                         train_features=seen[-1] if capture else None, virtual_out=virtual,
                                         mean_grad_out=mean_grad, saved=recorder, rng=rng))
            recorder = None  # the saved activations belong to the graph the real backward frees
        plain = per_sample.mean()
        if rw is not None:
            if virtual is None:
                loss, weights = rw.weighted_loss(per_sample, y)
            weights = weights.detach()
            stats.update(weighted_loss=loss.detach(), w_mean=weights.mean(), w_std=weights.std(unbiased=False),
                         w_min=weights.min(), w_max=weights.max())
        else:
            loss = plain
        stats["train_loss"] = plain.detach()
        if virtual is not None:
            self._set_real_gradient(virtual)
        elif mean_grad is not None:
            w = weights[0].to(mean_grad[0].dtype)  # one weight for the whole batch (new φ, constant)
            self._set_real_gradient(torch._foreach_mul(mean_grad, w))
        else:
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
