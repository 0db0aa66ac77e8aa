"""Weight averaging: an exponential moving average (EMA) of the parameters, written as the final weights.

train.ema_decay turns it on. After every optimizer step the average moves towards the weights,
average <- d * average + (1 - d) * weights, with d = min(ema_decay, (1 + n) / (10 + n)) after n
updates, so the first updates (the initialisation and the noisy early steps) wash out fast
instead of weighing on the average for 1 / (1 - ema_decay) steps. The average is fp32, one copy
of the trainable parameters; it goes into every checkpoint's state, so a resumed run averages
exactly as an unbroken one, and at the last step it replaces the weights: the final val-loss
estimate and the saved model are the average's, the estimates before it the raw weights'.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The EMA of `model`'s trainable parameters (a tied tensor once), starting from their current values."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The model's parameters become the average (in their own dtype)."""
        torch._foreach_copy_(self.params, self.average)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["average"]) != len(self.average):
            raise ValueError(f"a weight average of {len(state['average'])} tensors for {len(self.average)} parameters")
        self.updates = int(state["updates"])
        for mine, saved in zip(self.average, state["average"], strict=True):
            mine.copy_(saved)
