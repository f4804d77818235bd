"""An exponential moving average (EMA) of a net's weights, the weights a run's checkpoints embed with.

After every optimizer step ``average <- decay * average + (1 - decay) * weights`` for every float
parameter and buffer (BatchNorm running statistics too, as timm's ModelEma does), integer buffers
copied; the first update copies the weights. The average is a regulariser that costs no steps: it
smooths the last ~1 / (1 - decay) steps' noise out of the weights without slowing learning.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightAverage:
    """The EMA of ``net``: ``update(net)`` after each step, ``module`` is the averaged copy (eval only)."""

    def __init__(self, net: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0  # optimizer steps averaged so far (saved for --resume)
        self.module = copy.deepcopy(net)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Fold ``net``'s current weights (the same architecture, any train/eval mode) into the average."""
        averaged, current = self.module.state_dict(), net.state_dict()  # tensors that share the storage
        floats = [k for k, v in averaged.items() if v.is_floating_point()]
        if self.updates == 0:
            for k, v in averaged.items():
                v.copy_(current[k])
        else:
            torch._foreach_lerp_([averaged[k] for k in floats], [current[k].detach() for k in floats],
                                 1.0 - self.decay)
            for k, v in averaged.items():
                if not v.is_floating_point():
                    v.copy_(current[k])
        self.updates += 1

    def load(self, state: dict, updates: int) -> None:
        """Restore a saved average (``module``'s state dict) and its update count."""
        self.module.load_state_dict(state)
        self.updates = int(updates)
