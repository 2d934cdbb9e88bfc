"""The trainable connection: Linear(d_enc -> d_lm) per injected encoder state, or one shared (pt-L)."""

from __future__ import annotations

import torch
from torch import nn


class Connector(nn.Module):
    def __init__(self, encoder_dim: int, lm_dim: int, num_states: int, shared: bool = False):
        super().__init__()
        self.num_states = num_states
        self.shared = shared
        self.layers = nn.ModuleList(
            nn.Linear(encoder_dim, lm_dim) for _ in range(1 if shared else num_states)
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(B, K, d_enc) encoder [CLS] states -> (B, K, d_lm) tokens to inject."""
        if states.shape[1] != self.num_states:
            raise ValueError(f"expected {self.num_states} encoder states, got {states.shape[1]}")
        states = states.to(self.layers[0].weight.dtype)
        if self.shared:
            return self.layers[0](states)
        return torch.stack([layer(states[:, k]) for k, layer in enumerate(self.layers)], dim=1)
