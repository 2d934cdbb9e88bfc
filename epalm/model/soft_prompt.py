"""The soft prompt: N learned vectors prepended to the LM's input embeddings, with no positional embedding.

Either raw embeddings (pt-L) or the prefix-tuning MLP reparameterisation Embedding -> Linear -> Tanh -> Linear.
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompt(nn.Module):
    def __init__(self, num_tokens: int, dim: int, mlp: bool = True):
        super().__init__()
        self.num_tokens = num_tokens
        self.embedding = nn.Embedding(num_tokens, dim)  # N(0, 1) init, as nn.Embedding's default
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim)) if mlp else None

    def forward(self, batch_size: int) -> torch.Tensor:
        # Calling the Embedding module (not reading .weight) lets ZeRO-3 gather it automatically.
        ids = torch.arange(self.num_tokens, device=self.embedding.weight.device)
        prompt = self.embedding(ids)
        if self.mlp is not None:
            prompt = self.mlp(prompt)
        return prompt.unsqueeze(0).expand(batch_size, -1, -1)
