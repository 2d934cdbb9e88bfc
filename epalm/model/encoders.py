"""Frozen perception encoders. Each returns the [CLS] token of each of its last K blocks, after the encoder's
final norm (docs/model.md): images through timm ViTs, video through transformers' TimeSformer, audio
through transformers' AST.

Input shapes: image (B, 3, H, W); video (B, T, 3, H, W); audio fbank (B, 1024, 128). Output (B, K, D).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from epalm.config import EncoderConfig


class FrozenEncoder(nn.Module):
    """Shared behaviour: frozen, always in eval mode (no dropout / stochastic depth), no autograd graph."""

    embed_dim: int
    num_states: int

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        # The original left TimeSformer's stochastic depth on during training; a frozen encoder stays in eval.
        return super().train(False)


class ViTEncoder(FrozenEncoder):
    def __init__(self, model: nn.Module, num_states: int):
        super().__init__()
        self.model = model
        self.num_states = num_states
        self.embed_dim = model.embed_dim
        if num_states > len(model.blocks):
            raise ValueError(f"num_states={num_states} but the ViT has {len(model.blocks)} blocks")
        self._freeze()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        intermediates = self.model.forward_intermediates(
            images.to(self.model.cls_token.dtype),
            indices=self.num_states,
            norm=True,  # the final norm applied to every block's output, as the original
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
        return torch.stack([prefix[:, 0] for _, prefix in intermediates], dim=1)


class HFEncoder(FrozenEncoder):
    """TimesformerModel or ASTModel: hidden states of the last K layers through the model's final layernorm."""

    def __init__(self, model: nn.Module, num_states: int):
        super().__init__()
        self.model = model
        self.num_states = num_states
        self.embed_dim = model.config.hidden_size
        if num_states > model.config.num_hidden_layers:
            raise ValueError(
                f"num_states={num_states} but the encoder has {model.config.num_hidden_layers} layers"
            )
        self._freeze()

    @torch.no_grad()
    def forward(self, media: torch.Tensor) -> torch.Tensor:
        dtype = self.model.layernorm.weight.dtype
        if media.ndim == 4 and self.model.config.model_type == "timesformer":
            # an image (B, 3, H, W) is a still clip: the image in every frame (TimesformerLayer's
            # divided attention reshapes by config.num_frames, so one frame alone does not run)
            media = media.unsqueeze(1).expand(-1, self.model.config.num_frames, -1, -1, -1)
        out = self.model(media.to(dtype), output_hidden_states=True)
        states = out.hidden_states[-self.num_states :]
        # index 0 is [CLS] for both (AST's distillation token at index 1 is ignored, as the original)
        return torch.stack([self.model.layernorm(h[:, 0]) for h in states], dim=1)


def build_encoder(cfg: EncoderConfig, device: str | torch.device | None = None) -> FrozenEncoder:
    """Build the frozen encoder from a timm name / HF id / local path; random weights if not pretrained."""
    dtype = getattr(torch, cfg.dtype)  # config names are torch dtype names
    with torch.device(device or "cpu"):
        if cfg.kind == "vit":
            model = _build_timm_vit(cfg, load=device != "meta")
            encoder = ViTEncoder(model, cfg.num_states)
        else:
            encoder = HFEncoder(_build_hf(cfg, load=device != "meta"), cfg.num_states)
    return encoder.to(dtype)


def _build_timm_vit(cfg: EncoderConfig, load: bool) -> nn.Module:
    import timm

    kwargs = dict(num_classes=0, **cfg.config_overrides)
    if load and cfg.checkpoint:
        # timm reads .safetensors / .npz (augreg) / .pth with weights_only loading
        return timm.create_model(
            cfg.name, pretrained=True, pretrained_cfg_overlay={"file": cfg.checkpoint}, **kwargs
        )
    return timm.create_model(cfg.name, pretrained=load and cfg.pretrained, **kwargs)


def _build_hf(cfg: EncoderConfig, load: bool) -> nn.Module:
    from transformers import ASTConfig, ASTModel, TimesformerConfig, TimesformerModel

    model_cls, config_cls = {
        "timesformer": (TimesformerModel, TimesformerConfig),
        "ast": (ASTModel, ASTConfig),
    }[cfg.kind]
    if load and cfg.pretrained:
        return model_cls.from_pretrained(cfg.checkpoint or cfg.name, **cfg.config_overrides)
    # Random weights (tests) or the meta device (counting): the default configs are the base models.
    return model_cls(config_cls(**cfg.config_overrides))


REFERENCE_SEED = 0  # random-weight encoders (pretrained: false) are built under it wherever they must agree


def build_reference_encoder(cfg: EncoderConfig) -> FrozenEncoder:
    """`build_encoder` under `REFERENCE_SEED`, leaving the caller's RNG untouched: the feature cache and the
    trainer's fingerprint check get the same weights for a random encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(REFERENCE_SEED)
        return build_encoder(cfg)
