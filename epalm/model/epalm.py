"""The whole eP-ALM model: frozen encoder -> trainable connector -> injected into a frozen OPT, plus the soft prompt.

The trainable set is declared once (`TRAINABLE_MODULES`) and feeds the optimizer and the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, OPTForCausalLM
from transformers.utils import ModelOutput

from epalm.data.text import IGNORE_INDEX
from epalm.model.connector import Connector
from epalm.model.encoders import FrozenEncoder, build_encoder
from epalm.model.injection import injected_forward, layer_to_state, schedule_problems
from epalm.model.language_model import build_language_model
from epalm.model.soft_prompt import SoftPrompt

if TYPE_CHECKING:
    from epalm.config import ModelConfig

TRAINABLE_MODULES = ("connector", "prompt")


@dataclass
class EPALMOutput(ModelOutput):
    """A ModelOutput (dict-like) so ZeRO-3's hooks can see the tensors it holds."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V), text positions only


class EPALM(nn.Module):
    def __init__(
        self,
        lm: OPTForCausalLM,
        encoder: FrozenEncoder | None,
        connector: Connector,
        prompt: SoftPrompt | None,
        *,
        start_layer: int,
        end_layer: int,
        visual_attention: str = "causal",
        lm_loss_weight: float = 0.1,
    ):
        super().__init__()
        problems = schedule_problems(
            start_layer, end_layer, connector.num_states, lm.config.num_hidden_layers
        )
        if problems:
            raise ValueError("; ".join(problems))
        self.lm = lm
        self.encoder = encoder
        self.connector = connector
        self.prompt = prompt
        self.layer_states = layer_to_state(start_layer, end_layer, connector.num_states)
        self.visual_attention = visual_attention
        self.lm_loss_weight = lm_loss_weight

    # ----------------------------------------------------------------- trainable set

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The adapter: connector + soft prompt, by module membership (never by name matching)."""
        named = []
        for module_name in TRAINABLE_MODULES:
            module = getattr(self, module_name)
            if module is not None:
                named += [(f"{module_name}.{n}", p) for n, p in module.named_parameters()]
        return named

    def freeze_backbones(self) -> None:
        """requires_grad only on the adapter; the LM and encoder stay in eval mode."""
        trainable = {id(p) for _, p in self.trainable_named_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> EPALM:
        super().train(mode)
        self.lm.eval()  # frozen: no dropout, as a frozen backbone should be (the original left it on)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.trainable_named_parameters()}

    def adapter_state_problems(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Why `state` cannot be this model's adapter: missing, unexpected or mis-shaped keys (shapes only,
        so it also works on a model built on the meta device)."""
        own = dict(self.trainable_named_parameters())
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [
            f"{k}: shape {tuple(v.shape)} != model's {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        return problems

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load adapter weights; every key must match a trainable tensor of the same shape."""
        own = dict(self.trainable_named_parameters())
        problems = self.adapter_state_problems(state)
        if problems:
            raise ValueError("adapter state does not fit this model: " + "; ".join(problems))
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(own[k].dtype))

    # ----------------------------------------------------------------- forward

    def visual_tokens(
        self, media: torch.Tensor | None = None, encoder_states: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """(B, K, d_model) tokens to inject, from media (live encoder) or cached encoder states."""
        if encoder_states is None and media is not None:
            if self.encoder is None:
                raise ValueError("this model has no encoder; pass encoder_states (cached features)")
            encoder_states = self.encoder(media)
        if encoder_states is None:
            return None
        return self.connector(encoder_states)

    def prompt_embeds(self, batch_size: int) -> torch.Tensor | None:
        return None if self.prompt is None else self.prompt(batch_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        media: torch.Tensor | None = None,
        encoder_states: torch.Tensor | None = None,
    ) -> EPALMOutput:
        logits = self.lm_logits(
            input_ids,
            attention_mask,
            visual_tokens=self.visual_tokens(media, encoder_states),
            prompt_embeds=self.prompt_embeds(input_ids.shape[0]),
        )
        loss = None if labels is None else self.lm_loss_weight * summed_lm_loss(logits, labels).mean()
        return EPALMOutput(loss=loss, logits=logits)

    def lm_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        visual_tokens: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        cache: DynamicCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        return injected_forward(
            self.lm,
            input_ids,
            attention_mask,
            visual_tokens=visual_tokens,
            prompt_embeds=prompt_embeds,
            layer_states=self.layer_states,
            visual_attention=self.visual_attention,
            cache=cache,
            logits_to_keep=logits_to_keep,
        )


def summed_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample summed next-token cross-entropy (B,), as the original (docs/model.md, "Loss and text").

    Logits at position t predict labels at t+1; IGNORE_INDEX labels (padding, and the question
    with answer-only loss) contribute nothing.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return token_loss.view(shift_labels.shape).sum(dim=1)


def build_model(
    cfg: ModelConfig, device: str | torch.device | None = None, with_encoder: bool = True
) -> EPALM:
    """Build eP-ALM from its config. `device="meta"` counts parameters without memory or downloads;
    `with_encoder=False` skips the encoder when training from cached features."""
    lm = build_language_model(cfg.lm, device=device)
    encoder = build_encoder(cfg.encoder, device=device) if with_encoder else None
    encoder_dim = encoder.embed_dim if encoder is not None else _encoder_dim_without_building(cfg)
    adapter = cfg.adapter
    with torch.device(device or "cpu"):
        connector = Connector(
            encoder_dim, lm.config.hidden_size, cfg.encoder.num_states, adapter.shared_connector
        )
        prompt = (
            SoftPrompt(adapter.prompt_tokens, lm.config.word_embed_proj_dim, mlp=adapter.prompt_mlp)
            if adapter.prompt_tokens > 0
            else None
        )
    model = EPALM(
        lm,
        encoder,
        connector,
        prompt,
        start_layer=adapter.start_layer,
        end_layer=adapter.end_layer,
        visual_attention=adapter.visual_attention,
        lm_loss_weight=cfg.lm_loss_weight,
    )
    model.freeze_backbones()
    return model


def _encoder_dim_without_building(cfg: ModelConfig) -> int:
    return build_encoder(cfg.encoder, device="meta").embed_dim
