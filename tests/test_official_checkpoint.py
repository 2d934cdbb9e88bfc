"""The original project's adapter checkpoints load through the converter, safely."""

import pickle

import pytest
import torch

from epalm.model.official import convert_official_state_dict, load_official_checkpoint


def _official_state(model) -> dict:
    """A state dict with the original eP-ALM key names and shapes (docs/model.md, "Differences from the original")."""
    torch.manual_seed(5)
    state = {}
    for i, layer in enumerate(model.connector.layers):
        state[f"module.connector.{i}.weight"] = torch.randn_like(layer.weight)
        state[f"module.connector.{i}.bias"] = torch.randn_like(layer.bias)
    p = model.prompt
    state["module.prompt_module.prefix_embedding.0.weight"] = torch.randn_like(p.embedding.weight)
    state["module.prompt_module.prefix_embedding.1.weight"] = torch.randn_like(p.mlp[0].weight)
    state["module.prompt_module.prefix_embedding.1.bias"] = torch.randn_like(p.mlp[0].bias)
    state["module.prompt_module.prefix_embedding.3.weight"] = torch.randn_like(p.mlp[2].weight)
    state["module.prompt_module.prefix_embedding.3.bias"] = torch.randn_like(p.mlp[2].bias)
    return {"model": state, "epoch": 3}


def test_official_keys_load_and_forward_matches_direct_assignment(tiny_model, tmp_path):
    official = _official_state(tiny_model)
    path = tmp_path / "checkpoint_best.pth"
    torch.save(official, path)
    tiny_model.load_adapter_state_dict(load_official_checkpoint(path))

    # the same values set directly on the modules
    import copy

    direct = copy.deepcopy(tiny_model)
    s = official["model"]
    with torch.no_grad():
        for i, layer in enumerate(direct.connector.layers):
            layer.weight.copy_(s[f"module.connector.{i}.weight"])
            layer.bias.copy_(s[f"module.connector.{i}.bias"])
        direct.prompt.embedding.weight.copy_(s["module.prompt_module.prefix_embedding.0.weight"])
        direct.prompt.mlp[0].weight.copy_(s["module.prompt_module.prefix_embedding.1.weight"])
        direct.prompt.mlp[0].bias.copy_(s["module.prompt_module.prefix_embedding.1.bias"])
        direct.prompt.mlp[2].weight.copy_(s["module.prompt_module.prefix_embedding.3.weight"])
        direct.prompt.mlp[2].bias.copy_(s["module.prompt_module.prefix_embedding.3.bias"])
    ids = torch.randint(4, 300, (2, 6))
    mask = torch.ones_like(ids)
    media = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(
        tiny_model(ids, mask, media=media).logits, direct(ids, mask, media=media).logits
    )


def test_frozen_keys_are_ignored_and_unknown_keys_rejected(tiny_model):
    state = _official_state(tiny_model)["model"]
    state["model_text.model.decoder.embed_tokens.weight"] = torch.zeros(3)
    assert "connector.layers.0.weight" in convert_official_state_dict(state)
    state["adapter.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="not an eP-ALM adapter key"):
        convert_official_state_dict(state)


def test_shape_mismatch_is_a_clear_error(tiny_model):
    state = convert_official_state_dict(_official_state(tiny_model))
    state["connector.layers.0.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="shape"):
        tiny_model.load_adapter_state_dict(state)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_objects_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"connector.0.weight": _Evil(str(marker))}}, f)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_official_checkpoint(path)
    assert not marker.exists()
