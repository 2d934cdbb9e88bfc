"""Load the original eP-ALM project's released adapter checkpoints into this model.

Their files hold only the connector and the prompt (docs/model.md), under the keys
  connector.{i}.weight / .bias                    -> connector.layers.{i}.*
  prompt_module.prefix_embedding.0.weight         -> prompt.embedding.weight
  prompt_module.prefix_embedding.{1,3}.weight/bias -> prompt.mlp.{0,2}.*   (MLP reparameterisation)
possibly nested under "model" and prefixed by "module." (DDP). Frozen LM/encoder keys, if present, are
ignored. `.pth` files are read with `torch.load(weights_only=True)`: nothing is unpickled.

`python -m epalm.cli.official` converts a release into an adapter export directory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_FROZEN_PREFIXES = ("model_text.", "model_vision.", "transformer.")
_RULES = [
    (re.compile(r"^connector\.(\d+)\.(weight|bias)$"), r"connector.layers.\1.\2"),
    (re.compile(r"^prompt_module\.prefix_embedding\.0\.weight$"), "prompt.embedding.weight"),
    (re.compile(r"^prompt_module\.prefix_embedding\.1\.(weight|bias)$"), r"prompt.mlp.0.\1"),
    (re.compile(r"^prompt_module\.prefix_embedding\.3\.(weight|bias)$"), r"prompt.mlp.2.\1"),
]


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original eP-ALM adapter state dict to this project's keys; unknown keys are an error."""
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    converted, unknown = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_FROZEN_PREFIXES):
            continue
        for pattern, replacement in _RULES:
            if pattern.match(key):
                converted[pattern.sub(replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"not an eP-ALM adapter key: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if not converted:
        raise ValueError("no connector or prompt weights found in the checkpoint")
    return converted


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an original checkpoint safely (.pth with weights_only, or .safetensors) and convert its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unsafe pickle (optimizer objects, argparse namespaces...) is refused
            raise ValueError(
                f"{path}: refusing to unpickle non-tensor content ({type(e).__name__}: {e}). Re-save only the "
                "state dict, e.g. torch.save(ckpt['model'], 'adapter.pth'), on a machine you trust."
            ) from e
    return convert_official_state_dict(state)
