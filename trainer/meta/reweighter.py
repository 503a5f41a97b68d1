"""``MetaReweighter``: owns the meta-net g_φ and its Adam optimiser; computes ∇φ L_meta and the real-step weights.

Per training step (DESIGN.md "The meta step"):

    grads = rw.meta_gradient(model, (x, y), (xm, ym), lr, optimizer=opt)   # look-ahead, model left untouched
    rw.update(grads)                                                       # all-reduce (mean) + Adam on φ
    loss, w = rw.weighted_loss(per_sample_ce, y)                          # real step: weights from the new φ

Real-step convention: ``weights`` / ``weighted_loss`` treat w as a constant (computed under no_grad from the
detached losses), so the real step's θ gradient is Σ_i w_i ∇ℓ_i / N and nothing flows into φ (DESIGN.md step 3).
The look-ahead, in contrast, differentiates through the features u(θ) unless ``detach_features`` -- that is the
paper's definition of the virtual step and what makes the meta-gradient see how φ's inputs move with θ.

The meta-net is fp32 (``dtype`` exists for float64 tests); it follows the device of the labels it is given.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from common.registry import load
from trainer.config import CHOICES, ConfigError, MetaConfig, config_from_dict
from trainer.meta.lookahead import AutocastFactory, VirtualLossScale, unwrap_model
from trainer.meta.modes import LOOKAHEADS, MODE_KEYS
from trainer.meta.net import MetaNet, Weighting, meta_net_sizes


def _validate(cfg: MetaConfig, num_classes: int) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        if section == "meta" and getattr(cfg, key) not in allowed:
            raise ConfigError(f"config key '{dotted}': {getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    if num_classes < 2:
        raise ConfigError(f"MetaReweighter: num_classes must be >= 2, got {num_classes}")
    if not cfg.hidden or any(h < 1 for h in cfg.hidden):
        raise ConfigError(f"config key 'meta.hidden': need positive layer sizes, got {cfg.hidden}")
    if cfg.lr <= 0:
        raise ConfigError(f"config key 'meta.lr': must be > 0, got {cfg.lr}")
    if cfg.real_step == "lagged" and (cfg.lookahead != "exact" or not cfg.detach_features):
        raise ConfigError("config key 'meta.real_step': lagged needs meta.lookahead=exact and "
                          "meta.detach_features=true (only then is the virtual gradient the real one)")
    if cfg.fd_eps <= 0:
        raise ConfigError(f"config key 'meta.fd_eps': must be > 0, got {cfg.fd_eps}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class MetaReweighter:
    def __init__(self, cfg: MetaConfig, num_classes: int, *, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device | str] = None):
        _validate(cfg, num_classes)
        self.cfg = cfg
        self.num_classes = num_classes
        in_features, out_features = meta_net_sizes(cfg.granularity, num_classes, cfg.sample_one_hot)
        self.meta_net = MetaNet(in_features, out_features, cfg.hidden).to(device=device, dtype=dtype)
        # fused Adam reads `found_inf`, so a non-finite meta-gradient is skipped on the device (no host sync)
        self.optimizer = torch.optim.Adam(self.meta_net.parameters(), lr=cfg.lr, fused=True)
        self.weighting = Weighting(self.meta_net, cfg.granularity, num_classes, cfg.sample_one_hot)
        self.last_meta_loss: Optional[torch.Tensor] = None
        self.last_skipped = False
        self._scaled = False  # last meta_gradient ran with a GradScaler (fp16): update() then agrees on skips

    @classmethod
    def from_dict(cls, meta: dict, num_classes: int, **kwargs) -> "MetaReweighter":
        """From ``meta`` section keys; an unknown key or a bad value raises ConfigError naming 'meta.<key>'."""
        return cls(config_from_dict({"meta": dict(meta)}).meta, num_classes, **kwargs)

    # ------------------------------------------------------------------------------------------------ helpers
    def lookahead_lr(self, optim_lr: float) -> float:
        """α: ``meta.lookahead_lr`` when set, else the real optimiser's learning rate."""
        return self.cfg.lookahead_lr if self.cfg.lookahead_lr > 0 else optim_lr

    def is_meta_step(self, step: int) -> bool:
        return step % self.cfg.every == 0

    def to(self, device) -> "MetaReweighter":
        """Move φ and its optimiser state (Adam state is created on φ's device, so move both)."""
        self.meta_net.to(device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v):  # fused Adam keeps `step` on the parameters' device too
                    state[k] = v.to(device)
        return self

    def _follow(self, t: torch.Tensor) -> None:
        if next(self.meta_net.parameters()).device != t.device:
            self.to(t.device)

    # ------------------------------------------------------------------------------------------------ meta step
    def rescales_mean_gradient(self) -> bool:
        """``exact``, batch granularity, detached features: every sample has the same weight w and w does not depend
        on θ, so the real gradient is w_new·∇θ mean(ℓ) -- a rescale of the gradient the look-ahead already took."""
        return self.cfg.lookahead == "exact" and self.cfg.granularity == "batch" and self.cfg.detach_features

    def shares_forward(self) -> bool:
        """Whether the meta step can reuse the real step's forward (``meta.share_forward``; ``exact`` and ``head``;
        ``second_order`` stays on its own forward: it is the independent oracle)."""
        return self.cfg.share_forward and self.cfg.lookahead in ("exact", "head")

    def meta_gradient(self, model: nn.Module, train_batch, meta_batch, lr, *, optimizer=None,
                      autocast: AutocastFactory = None, grad_scaler=None,
                      train_losses: Optional[torch.Tensor] = None, train_features: Optional[torch.Tensor] = None,
                      virtual_out: Optional[list] = None, mean_grad_out: Optional[list] = None,
                      saved_activations=None, rng=None) -> list[torch.Tensor]:
        """∇φ L_meta (list aligned with ``meta_net.parameters()``); model params/.grad/BN buffers untouched.

        Shared forward (``shares_forward()``): ``train_losses`` are the per-sample losses of the real step's own
        forward on ``train_batch`` with their graph (``exact`` takes the virtual gradient from it and leaves it
        alive for the real backward); ``train_features`` the fc input captured in that forward (``head``).
        ``virtual_out`` (``exact``): receives the rank-local virtual gradient ∇θ L_w(θ, φ before this update);
        ``mean_grad_out`` (``exact``, batch granularity, detached features): receives ∇θ mean(ℓ).
        ``saved_activations`` (``exact``, forward_ad): a ``tangents.ActivationRecorder`` of the shared forward;
        ``rng`` (``exact``): the ``RngSnapshot`` taken before the shared forward (its dropout draws are replayed).

        ``optimizer``: the live θ optimiser (for ``lookahead_optimizer: adam``). ``autocast``: a context-manager
        factory for the network forwards. ``grad_scaler``: fp16 -- the virtual losses are scaled by its current
        scale and the gradients unscaled by hand; a non-finite value gives zero grads and ``last_skipped=True``
        (this check reads one flag from the device, only in the fp16 path, as GradScaler.step does itself).
        """
        x, y = train_batch
        self._follow(y)
        module = unwrap_model(model)
        scale = VirtualLossScale(grad_scaler, y.device)
        common = dict(detach_features=self.cfg.detach_features, lookahead_optimizer=self.cfg.lookahead_optimizer,
                      optimizer=optimizer, autocast=autocast, scale=scale)
        mode = self.cfg.lookahead
        if mode not in LOOKAHEADS:
            raise ValueError(f"config key 'meta.lookahead': {mode!r} is not one of {', '.join(LOOKAHEADS)}")
        common.update({key: getattr(self.cfg, key) for key in MODE_KEYS.get(mode, ())})
        # shared-forward inputs (steps.py): only those the caller set, so a mode without them never receives them
        shared = dict(train_losses=train_losses, train_features=train_features, virtual_out=virtual_out,
                      mean_grad_out=mean_grad_out, saved=saved_activations, rng=rng)
        common.update({k: v for k, v in shared.items() if v is not None})
        grads, meta_loss = load(LOOKAHEADS, mode)(module, train_batch, meta_batch, lr, self.weighting, **common)
        self._scaled = scale.enabled
        self.last_skipped = False
        if scale.enabled:
            scale.check(grads)
            self.last_skipped = bool(scale.found_inf.item())
            if self.last_skipped:
                grads = [torch.zeros_like(g) for g in grads]
        self.last_meta_loss = meta_loss
        return grads

    def update(self, grads: Sequence[torch.Tensor]) -> None:
        """Mean over ranks (one all-reduce of the flattened grads), then one Adam step on φ.

        After an fp16 meta step the all-reduce carries each rank's skip flag too, and every rank skips the step
        when any rank skipped -- φ must stay identical across ranks.
        """
        params = list(self.meta_net.parameters())
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"MetaReweighter.update: got {len(grads)} gradients for {len(params)} parameters")
        grads = [g.detach().to(device=p.device, dtype=p.dtype).reshape(p.shape) for p, g in zip(params, grads)]
        skip = self.last_skipped
        if _distributed():
            parts = [g.reshape(-1) for g in grads]
            if self._scaled:
                parts.append(torch.full((1,), float(self.last_skipped), device=params[0].device, dtype=params[0].dtype))
            flat = torch.cat(parts)
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            if self._scaled:
                skip = bool(flat[-1].item() > 0)
            grads = [t.view_as(p) for t, p in zip(torch.split(flat[:sum(p.numel() for p in params)],
                                                              [p.numel() for p in params]), params)]
        if skip:
            return
        for p, g in zip(params, grads):
            p.grad = g.clone()
        # NaN/inf anywhere (a poisoned batch on any rank: the mean carries it to every rank alike) -> every rank
        # skips this update inside the fused kernel, so φ stays finite and identical without a host sync
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        self.optimizer.found_inf = None
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------------ real step
    def weights(self, per_sample_loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (N,) from the current φ; no graph (neither into φ nor through the losses)."""
        self._follow(labels)
        with torch.no_grad():
            feats = self.weighting.to_meta(per_sample_loss.detach())
            return self.weighting.coefficients(feats, labels)

    def weighted_loss(self, per_sample_loss: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_w = mean_i w_i ℓ_i, w): the gradient reaches θ through ℓ only; w is a constant."""
        w = self.weights(per_sample_loss, labels)
        return (w.to(device=per_sample_loss.device, dtype=per_sample_loss.dtype) * per_sample_loss).mean(), w

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"meta_net": self.meta_net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"meta_net", "optimizer"} - set(state)
        if missing:
            raise ValueError(f"MetaReweighter.load_state_dict: missing keys {sorted(missing)}")
        try:
            self.meta_net.load_state_dict(state["meta_net"])
        except RuntimeError as e:
            raise ValueError(f"MetaReweighter.load_state_dict: the saved meta-net does not fit this one "
                             f"(granularity/hidden/num_classes changed?): {e}") from None
        # deep copy: Optimizer.load_state_dict keeps same-device tensors by reference, and a state dict taken
        # from another live reweighter would then share (and double-step) its Adam moments
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    def broadcast_from(self, src: int = 0) -> None:
        """Copy φ from rank ``src`` to every rank (no-op without a process group)."""
        if not _distributed():
            return
        with torch.no_grad():
            for p in self.meta_net.parameters():
                dist.broadcast(p.data, src)
