"""Build-time feature cache: run the frozen encoder once and store each sample's per-layer [CLS] states.

Cached features lose train-time augmentation: they come from the eval transform of the stored media.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np

from epalm.data import schema

BATCH_SIZE = 16
_ENCODERS: dict[str, object] = {}  # per worker process: fingerprint -> built encoder


def encoder_config(spec: str, layers: int | None):
    """`spec` is a YAML run config (its model.encoder) or a timm ViT name; returns (EncoderConfig, data cfg or None)."""
    from epalm.config import EncoderConfig, load_config

    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        cfg = load_config(spec)
        enc, data = cfg.model.encoder, cfg.data
    else:
        enc, data = EncoderConfig(kind="vit", name=spec), None
    if layers is not None:
        enc = dataclasses.replace(enc, num_states=layers)
    return enc, data


def make_spec(spec: str, layers: int | None, modality: str, image_size: int, num_frames: int) -> dict:
    """Build the encoder once here to hash its weights; the picklable spec lets each worker rebuild it."""
    enc, data = encoder_config(spec, layers)
    normalization = data.normalization if data is not None else "clip"
    input_size = data.image_size if data is not None else image_size
    from epalm.model.encoders import build_reference_encoder

    encoder = build_reference_encoder(enc)
    fp = schema.encoder_fingerprint(
        enc, encoder.state_dict(), modality, input_size, num_frames, normalization
    )
    spec_dict = {
        "config": dataclasses.asdict(enc),
        "modality": modality,
        "image_size": input_size,
        "normalization": normalization,
        "fingerprint": fp,
    }
    _ENCODERS[_cache_key(spec_dict)] = encoder
    return spec_dict


def _cache_key(spec: dict) -> str:
    return repr(sorted(spec["fingerprint"].items()))


def _encoder(spec: dict):
    key = _cache_key(spec)
    if key not in _ENCODERS:
        import multiprocessing as mp

        import torch

        from epalm.config import EncoderConfig
        from epalm.model.encoders import build_reference_encoder

        if mp.parent_process() is not None:
            torch.set_num_threads(1)  # one of several worker processes: do not oversubscribe the cores
        encoder = build_reference_encoder(EncoderConfig(**spec["config"]))
        # a worker process must encode with exactly the weights the manifest names
        got = schema.weights_hash(encoder.state_dict())
        if got != spec["fingerprint"]["weights_hash"]:
            raise RuntimeError(
                f"encoder weights differ between processes ({got} != {spec['fingerprint']['weights_hash']})"
            )
        _ENCODERS[key] = encoder
    return _ENCODERS[key]


def _pixels(jpeg: bytes):
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as img:
        arr = np.asarray(img.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _transform(spec: dict):
    from epalm.data.transforms import AudioTransform, ImageTransform

    if spec["modality"] == "audio":
        return AudioTransform(train=False)
    return ImageTransform(size=spec["image_size"], train=False, normalization=spec["normalization"])


def _input(members: dict[str, bytes], spec: dict, transform):
    """One sample's encoder input, with the eval transform the loader applies to the same members."""
    import torch

    if spec["modality"] == "audio":
        fbank = np.load(io.BytesIO(members[schema.AUDIO]), allow_pickle=False)
        return transform(torch.from_numpy(fbank.astype(np.float32)))
    if spec["modality"] == "image":
        return transform(_pixels(members[schema.IMAGE]))
    frames = sorted(k for k in members if k.startswith("frame"))
    return transform(torch.stack([_pixels(members[k]) for k in frames]))  # (T, 3, H, W)


def encode_samples(samples: list[tuple[str, dict[str, bytes]]], spec: dict) -> tuple[dict, dict]:
    """Features (K, D) float16 per sample key, and {key: error} for samples the encoder could not take."""
    import torch

    encoder = _encoder(spec)
    feats, failed = {}, {}
    inputs, transform = [], _transform(spec)
    for key, members in samples:
        try:
            inputs.append((key, _input(members, spec, transform)))
        except Exception as e:  # a member the transform rejects: skip the sample, not the shard
            failed[key] = f"{type(e).__name__}: {e}"
    for i in range(0, len(inputs), BATCH_SIZE):
        keys = [k for k, _ in inputs[i : i + BATCH_SIZE]]
        with torch.no_grad():
            states = encoder(torch.stack([x for _, x in inputs[i : i + BATCH_SIZE]]))
        for key, s in zip(keys, states.float().cpu().numpy().astype(np.float16)):
            feats[key] = s
    return feats, failed
