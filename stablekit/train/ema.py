"""Exponential moving average of a model's weights, the copy that samples best (LDM's ``LitEma``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copies of the trainable parameters, in fp32, updated after every optimizer step.

    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates n, so early
    shadows are not dominated by the random initialisation (the same warm-up as LDM's ``LitEma``).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)

    def weights(self, model: nn.Module) -> dict[str, Tensor]:
        """``model``'s state dict with the averaged parameters in place of the live ones (buffers as they are)."""
        state = model.state_dict()
        return {k: self.shadow[k].to(t.dtype) if k in self.shadow else t for k, t in state.items()}

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        if set(shadow) != set(self.shadow):
            raise ValueError("EMA state does not match the model's trainable parameters")
        self.shadow = {k: v.float().clone() for k, v in shadow.items()}
        updates = state["updates"]
        assert isinstance(updates, int)
        self.updates = updates
