"""An exponential moving average of a network's weights: the model a run evaluates and keeps.

    ema = WeightAverage(net, decay=0.998)
    for step ...: optimizer.step(); ema.update(net)
    probs = predict(ema.module, ...)

The average follows the trained weights with ``decay`` per optimiser step, after a warm-up
(``min(decay, (1 + t) / (10 + t))`` at step ``t``, as timm's ``ModelEmaV3`` does) so the random
initial weights are forgotten within the first epoch. Float buffers (BatchNorm's running
statistics) are averaged too; integer buffers are copied. Measured on the benchmark data
(custom_cnn, 48 px, two split seeds): the average's val study kappa rises smoothly instead of
swinging by ±0.2 from epoch to epoch as the class threshold is crossed back and forth, and after
30 epochs it is higher (0.68 and 0.69 against 0.60 and 0.64; val AUC 0.91 against 0.86-0.88).
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    """The moving average of ``net``'s parameters and buffers (``module`` is an eval-ready copy)."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.steps = 0
        self.module = copy.deepcopy(net).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def rate(self) -> float:
        """The decay of the next update (warm-up first)."""
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        """Move the average towards ``net``'s current weights (call after each optimiser step)."""
        d = self.rate()
        for avg, cur in zip(self.module.state_dict().values(), net.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.lerp_(
                    cur.detach(), 1.0 - d
                )  # exact where the weights did not move (frozen blocks)
            else:
                avg.copy_(cur)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.steps = int(state["steps"])
