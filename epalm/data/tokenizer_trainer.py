"""Offline stand-ins for tests, the demo and benchmarks: a byte-level BPE tokenizer in OPT's file format."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3


def save_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE on `texts` and save it as OPT ships its tokenizer (vocab.json, merges.txt).

    `AutoTokenizer.from_pretrained(out_dir)` then gives a GPT2Tokenizer that prepends `</s>` as BOS,
    pads with `<pad>` (id 1) and ends with `</s>` (id 2), like facebook/opt-*.
    """
    from tokenizers import ByteLevelBPETokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1, special_tokens=_SPECIALS)
    bpe.save_model(str(out))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 2048,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
    return out
