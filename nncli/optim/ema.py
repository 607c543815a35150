"""`train.ema`: an exponential moving average of the model's weights, updated after every optimizer
step, validated in the model's place and saved as the checkpoints' `model`.

Written by hand rather than with `torch.optim.swa_utils.AveragedModel`: AveragedModel keeps the
copy as a submodule (its state_dict's keys gain a `module.` prefix and an `n_averaged` entry, so
best.pt's model would not load into the config's nn.Sequential as it is), and it averages either
the parameters alone (BatchNorm's running statistics are then the live model's, not averaged
with the weights they go with) or every buffer, integer counters too (num_batches_tracked gets
blended in floating point and truncated). Here every floating-point tensor of the state_dict,
parameters and buffers, is averaged, in one `torch._foreach_lerp_` (what AveragedModel's EMA
calls), and other tensors are copied.

At update t (1, 2, ...) the average moves by
    ema = decay_t * ema + (1 - decay_t) * weights,   decay_t = min(decay, (1 + t) / (10 + t))
with `warmup` (TensorFlow's ExponentialMovingAverage with num_updates), else decay_t = decay;
it starts from the weights training starts from (timm and Keras do the same).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """The average (`model`, a copy of the live model that is never trained) of a live model's
    weights, and how many updates it has had."""

    def __init__(self, live: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model = copy.deepcopy(live).eval().requires_grad_(False)
        self.bind(live)

    def bind(self, live: nn.Module) -> None:
        """Pair the average's tensors with the live model's, for `update`; again whenever the live
        model's tensors were replaced (moved to another device or memory format)."""
        own, theirs = self.model.state_dict(keep_vars=True), live.state_dict(keep_vars=True)
        shared = {id(own[key]): key for key in reversed(own)}  # a tensor tied under two names: once
        pairs = [(own[key].detach(), theirs[key].detach()) for key in own if shared[id(own[key])] == key]
        self._floats = [pair for pair in pairs if pair[0].is_floating_point()]
        self._others = [pair for pair in pairs if not pair[0].is_floating_point()]

    def decay_at(self, update: int) -> float:
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move the average towards the live weights."""
        self.updates += 1
        if self._floats:
            averages, weights = zip(*self._floats)
            torch._foreach_lerp_(list(averages), list(weights), 1.0 - self.decay_at(self.updates))
        for average, value in self._others:
            average.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = updates
