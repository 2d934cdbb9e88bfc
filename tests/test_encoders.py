"""Encoders return the [CLS] of each of the last K blocks after the final norm, for timm ViT and HF TimeSformer/AST."""

import torch

from epalm.config import EncoderConfig
from epalm.model.encoders import build_encoder
from testing.support import TINY_HF, TINY_VIT


def test_vit_states_are_final_norm_of_block_outputs():
    torch.manual_seed(0)
    enc = build_encoder(
        EncoderConfig(
            kind="vit", name="vit_base_patch16_224", pretrained=False, num_states=3, config_overrides=TINY_VIT
        )
    )
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in enc.model.blocks]
    images = torch.randn(2, 3, 16, 16)
    states = enc(images)
    for h in hooks:
        h.remove()
    expected = torch.stack([enc.model.norm(o)[:, 0] for o in outputs[-3:]], dim=1)
    assert states.shape == (2, 3, 24)
    torch.testing.assert_close(states, expected)
    assert not any(p.requires_grad for p in enc.parameters())


def test_timesformer_states():
    torch.manual_seed(0)
    cfg = EncoderConfig(
        kind="timesformer",
        name="facebook/timesformer-base-finetuned-k600",
        pretrained=False,
        num_states=2,
        config_overrides=dict(TINY_HF, image_size=16, patch_size=8, num_frames=4),
    )
    enc = build_encoder(cfg)
    video = torch.randn(2, 4, 3, 16, 16)
    states = enc(video)
    out = enc.model(video, output_hidden_states=True)
    assert states.shape == (2, 2, 24)
    # the last state is the model's own final (normed) [CLS]
    torch.testing.assert_close(states[:, -1], out.last_hidden_state[:, 0])
    torch.testing.assert_close(states[:, 0], enc.model.layernorm(out.hidden_states[-2][:, 0]))


def test_ast_states_use_cls_not_distillation_token():
    torch.manual_seed(0)
    cfg = EncoderConfig(
        kind="ast",
        name="MIT/ast-finetuned-audioset-10-10-0.4593",
        pretrained=False,
        num_states=2,
        config_overrides=dict(TINY_HF, max_length=64, num_mel_bins=32, patch_size=16),
    )
    enc = build_encoder(cfg)
    with torch.no_grad():  # HF initialises both tokens to zeros; make them distinguishable
        enc.model.embeddings.cls_token.normal_()
        enc.model.embeddings.distillation_token.normal_()
    fbank = torch.randn(2, 64, 32)
    states = enc(fbank)
    out = enc.model(fbank, output_hidden_states=True)
    assert states.shape == (2, 2, 24)
    torch.testing.assert_close(states[:, -1], out.last_hidden_state[:, 0])
    assert not torch.allclose(states[:, -1], out.last_hidden_state[:, 1])


def test_encoder_stays_in_eval_mode():
    enc = build_encoder(
        EncoderConfig(
            kind="vit", name="vit_base_patch16_224", pretrained=False, num_states=2, config_overrides=TINY_VIT
        )
    )
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
