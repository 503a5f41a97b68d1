"""Same dropout / stochastic-depth draws in every pass one meta step makes over the same batch.

The ``exact`` look-ahead combines quantities from several passes over the train batch -- the forward behind the
virtual gradient, then the dual-number forward (or the two difference forwards) for d_i = ⟨v, ∇θ ℓ_i⟩. With
dropout on, each pass would otherwise draw its own masks: d would be the directional derivative of a *different*
random network than the one whose gradient moved θ, and the meta-gradient would not be the derivative of anything.
``RngSnapshot`` records the generator states before the first pass; ``replay()`` runs a later pass from that
state and afterwards puts the generators back where they were, so the stream the rest of the step (the meta
forward, the real step) draws from is the same as if the replayed pass had not run. Reading/setting a CUDA
generator state is host-side bookkeeping (seed, offset): no device sync.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class RngSnapshot:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.index = device.index if device.index is not None else (torch.cuda.current_device() if self.cuda else 0)
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.index) if self.cuda else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the generators as they were at the snapshot; restore the current state after."""
        with torch.random.fork_rng(devices=[self.index] if self.cuda else [], device_type="cuda"):
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state, self.index)
            yield
