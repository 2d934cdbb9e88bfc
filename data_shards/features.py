"""The feature cache's one extraction path: build the frozen encoder, turn stored media into its input, encode.

`data_shards.build --encoder` runs it inside its worker processes (small sets); `data_shards.extract` runs the
same functions with DataLoader workers for the input and a GPU (or CPU) for the encoder. Cached features lose
train-time augmentation: they come from the eval transform of the stored media.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from epalm.data import schema

BATCH_SIZE = 16  # the builder's batch; extract's default too, so both give the same bytes on CPU
_ENCODERS: dict[str, object] = {}  # per worker process: fingerprint -> built encoder


def encoder_config(spec: str, layers: int | None, dtype: str | None = None):
    """`spec` is a YAML run config (its model.encoder) or a timm ViT name; returns (EncoderConfig, data cfg or None)."""
    from epalm.config import EncoderConfig, load_config

    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        cfg = load_config(spec)
        enc, data = cfg.model.encoder, cfg.data
    else:
        enc, data = EncoderConfig(kind="vit", name=spec), None
    if layers is not None:
        enc = dataclasses.replace(enc, num_states=layers)
    if dtype is not None:
        enc = dataclasses.replace(enc, dtype=dtype)
    return enc, data


def build_frozen_encoder(enc):
    """The encoder under the library's fixed seed (`build_reference_encoder`), as the trainer's fingerprint
    check builds it, so a random-weight encoder (pretrained: false) is the same everywhere."""
    from epalm.model.encoders import build_reference_encoder

    return build_reference_encoder(enc)


def make_spec(
    spec: str, layers: int | None, modality: str, image_size: int, num_frames: int, dtype: str | None = None
) -> tuple[dict, object]:
    """The picklable spec (config, input, fingerprint) that lets any process rebuild the encoder, and the
    encoder built here to hash its weights. `image_size` is the input size unless the run config sets one."""
    enc, data = encoder_config(spec, layers, dtype)
    normalization = data.normalization if data is not None else "clip"
    input_size = data.image_size if data is not None else image_size
    encoder = build_frozen_encoder(enc)
    fp = schema.encoder_fingerprint(
        enc, encoder.state_dict(), modality, input_size, num_frames, normalization
    )
    spec_dict = {
        "config": dataclasses.asdict(enc),
        "modality": modality,
        "image_size": input_size,
        "num_frames": num_frames,
        "normalization": normalization,
        "fingerprint": fp,
    }
    _ENCODERS[_cache_key(spec_dict)] = encoder
    return spec_dict, encoder


def _cache_key(spec: dict) -> str:
    return repr(sorted(spec["fingerprint"].items()))


def check_weights(encoder, spec: dict, where: str) -> None:
    """An encoder must encode with exactly the weights the fingerprint names."""
    got = schema.weights_hash(encoder.state_dict())
    if got != spec["fingerprint"]["weights_hash"]:
        raise RuntimeError(
            f"{where}: encoder weights hash {got} differs from the fingerprint's "
            f"{spec['fingerprint']['weights_hash']} ({spec['fingerprint']['encoder']})"
        )


def _encoder(spec: dict):
    key = _cache_key(spec)
    if key not in _ENCODERS:
        import multiprocessing as mp

        import torch

        from epalm.config import EncoderConfig

        if mp.parent_process() is not None:
            torch.set_num_threads(1)  # one of several worker processes: do not oversubscribe the cores
        encoder = build_frozen_encoder(EncoderConfig(**spec["config"]))
        check_weights(encoder, spec, f"builder worker process {mp.current_process().name}")
        _ENCODERS[key] = encoder
    return _ENCODERS[key]


def _pixels(jpeg: bytes):
    """JPEG bytes -> uint8 (3, H, W), decoded as the loader decodes them."""
    from epalm.data.collate import decode_image

    return decode_image(jpeg)


def input_transform(spec: dict):
    """The loader's eval transform for the spec's modality and input size."""
    from epalm.data.transforms import AudioTransform, ImageTransform

    if spec["modality"] == "audio":
        return AudioTransform(train=False)
    return ImageTransform(size=spec["image_size"], train=False, normalization=spec["normalization"])


def input_shape(spec: dict) -> tuple[int, ...]:
    """The encoder input every sample must have, so a batch always stacks."""
    s = spec["image_size"]
    return {
        "audio": (schema.AUDIO_TARGET_LENGTH, schema.AUDIO_NUM_MEL_BINS),
        "image": (3, s, s),
        "video": (spec["num_frames"], 3, s, s),
    }[spec["modality"]]


def sample_input(members: dict[str, bytes], spec: dict, transform):
    """One sample's encoder input, with the eval transform the loader applies to the same members."""
    import torch

    from epalm.data.collate import decode_npy

    if spec["modality"] == "audio":
        x = transform(torch.from_numpy(decode_npy(members[schema.AUDIO]).astype(np.float32)))
    elif spec["modality"] == "image":
        x = transform(_pixels(members[schema.IMAGE]))
    else:
        frames = sorted(k for k in members if k.startswith("frame") and k.endswith(".jpg"))
        if not frames:
            raise ValueError("no frameNNN.jpg members")
        x = transform(torch.stack([_pixels(members[k]) for k in frames]))  # (T, 3, H, W)
    if tuple(x.shape) != input_shape(spec):
        raise ValueError(f"encoder input of shape {tuple(x.shape)}, expected {input_shape(spec)}")
    return x


def prepare_inputs(samples: Sequence[tuple[str, dict[str, bytes]]], spec: dict) -> tuple[list, dict]:
    """[(key, input)] for the samples the transform takes, and {key: error} for the others."""
    inputs, failed, transform = [], {}, input_transform(spec)
    for key, members in samples:
        try:
            inputs.append((key, sample_input(members, spec, transform)))
        except Exception as e:  # a member the transform rejects: skip the sample, not the shard
            failed[key] = f"{type(e).__name__}: {e}"
    return inputs, failed


class BatchEncoder:
    """Runs the encoder on a device batch by batch, reading a batch's features back only after the next
    batch is queued, so a GPU never waits for the host. Features land in the `sink` given with each batch."""

    def __init__(self, encoder, device=None):
        self.encoder, self.device = encoder, device
        self._queued = None  # (keys, states on the host, cuda event or None, sink)

    def submit(self, keys: Sequence[str], x, sink: dict) -> None:
        import torch

        with torch.inference_mode():
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
            states = self.encoder(x)
            event = None
            if states.is_cuda:
                states = states.to("cpu", non_blocking=True)  # into pinned memory, asynchronously
                event = torch.cuda.Event()
                event.record()
        self.flush()
        self._queued = (list(keys), states, event, sink)

    def flush(self) -> None:
        if self._queued is None:
            return
        keys, states, event, sink = self._queued
        if event is not None:
            event.synchronize()
        for key, s in zip(keys, states.float().numpy().astype(np.float16)):
            sink[key] = s
        self._queued = None


def encode_inputs(encoder, inputs: Sequence[tuple[str, object]], batch_size: int, device=None) -> dict:
    """Features (K, D) float16 per key: consecutive inputs in batches of `batch_size`, so the batches
    (and the kernels' rounding) depend only on the inputs, never on who runs them."""
    import torch

    feats: dict = {}
    runner = BatchEncoder(encoder, device)
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i : i + batch_size]
        runner.submit([k for k, _ in chunk], torch.stack([x for _, x in chunk]), feats)
    runner.flush()
    return feats


def encode_samples(samples: list[tuple[str, dict[str, bytes]]], spec: dict) -> tuple[dict, dict]:
    """Features (K, D) float16 per sample key, and {key: error} for samples the encoder could not take."""
    inputs, failed = prepare_inputs(samples, spec)
    return encode_inputs(_encoder(spec), inputs, BATCH_SIZE), failed
