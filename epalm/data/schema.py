"""The shard format: member names, the per-sample JSON and the manifest, shared by `data_shards` and the loader.

A sample in a tar shard is a group of members `<key>.<ext>`:
  json           text and ids (see `SampleMeta` keys below), always present
  jpg            image, shorter side = the build's --image-size
  frame000.jpg…  video frames (frameNNN.jpg, NNN from 000), evenly sampled
  fbank.npy      audio: float16 (1024, 128) Kaldi log-mel fbank, 16 kHz
  feats.npy      optional cached encoder [CLS] states: float16 (K, D)
Only .json, .jpg and .npy (loaded with allow_pickle=False) are ever decoded.
"""

from __future__ import annotations

JSON = "json"
IMAGE = "jpg"
AUDIO = "fbank.npy"
FEATURES = "feats.npy"
MANIFEST = "manifest.json"
SAFE_EXTENSIONS = (".json", ".jpg", ".npy", ".txt")


def frame_member(index: int) -> str:
    return f"frame{index:03d}.jpg"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# Keys of the per-sample JSON member:
#   id (str), source (str), split (str), task ("caption" | "qa"), modality ("image" | "video" | "audio"),
#   captions (list[str], caption tasks), question (str, qa), answers (list[{"answer": str, "score": float}], qa),
#   question_id, image_id / video_id / audio_id (as in the source annotations),
#   answer_type, question_type (VQA v2 only)
TASKS = ("caption", "qa")
MODALITIES = ("image", "video", "audio")

SCHEMA_VERSION = 1

# Extra per-sample JSON keys written by data_shards:
#   image_path / video_path / audio_path (str, relative to --media-root, for debugging),
#   raw_answers (list[str], the 10 VQA v2 answers), multiple_choice_answer (VQA v2),
#   audiocap_ids, start_time (AudioCaps CSV), full_answer (GQA), url (CC3M img2dataset).
#   `answers` is [] when the split has no ground truth (VQA v2 test, GQA challenge test).

# Audio front end (docs/data.md): the fbank is computed once at build time with these settings.
AUDIO_SAMPLE_RATE = 16000
AUDIO_NUM_MEL_BINS = 128
AUDIO_TARGET_LENGTH = 1024

# Skip reasons a build counts in the manifest's `skipped`.
SKIP_REASONS = (
    "malformed_record",  # an annotation entry lacks fields or has the wrong types
    "unknown_media_type",  # jsonl: no "modality" and a file extension it does not know
    "mixed_kind",  # jsonl: a line of another task or modality than most of the file's
    "missing_media",  # the referenced file does not exist
    "path_escapes_root",  # the media path points outside --media-root
    "corrupt_image",
    "unreadable_video",
    "unreadable_audio",
    "encoder_error",  # the feature cache could not encode the sample
)

# Reasons the loader skips a sample at training time (counted in the metrics log, see docs/loader.md).
LOAD_SKIP_REASONS = (
    "shard_read_error",  # the shard failed before this sample (truncated, unreadable after retries)
    "missing_member",  # no json member, or no media member of the dataset's modality
    "bad_json",  # the json member does not parse to an object
    "bad_text",  # the json lacks the question/answers/captions the task needs
    "corrupt_media",  # the jpg / npy member does not decode
)


def done_record_name(shard: str) -> str:
    """The per-shard done-record written after the shard is renamed into place."""
    return shard + ".json"


def fingerprint(
    encoder: str,
    weights_hash: str,
    layers: int,
    preprocessing: str,
    image_size: int,
    **extra: object,
) -> dict:
    """The provenance of cached encoder features; training refuses features with a different one."""
    fp = {
        "encoder": encoder,
        "weights_hash": weights_hash,
        "layers": int(layers),
        "preprocessing": preprocessing,
        "image_size": int(image_size),
    }
    fp.update(extra)
    return fp


def preprocessing_name(modality: str, normalization: str, num_frames: int) -> str:
    """How stored media become encoder input at test time (the eval transform of epalm.data.transforms)."""
    if modality == "audio":
        return f"audio:fbank{AUDIO_NUM_MEL_BINS}x{AUDIO_TARGET_LENGTH}@{AUDIO_SAMPLE_RATE}:ast-norm"
    frames = f":frames={num_frames}" if modality == "video" else ""
    return f"{modality}:jpeg-resize-bicubic:{normalization}{frames}"


def encoder_fingerprint(
    encoder_cfg: object, state_dict: dict, modality: str, image_size: int, num_frames: int, normalization: str
) -> dict:
    """The fingerprint of an `epalm.config.EncoderConfig` and its built encoder's weights.

    The builder records it in the manifest; training computes it again and calls check_fingerprint.
    """
    cfg = encoder_cfg
    return fingerprint(
        encoder=f"{cfg.kind}:{cfg.name}:{cfg.dtype}",
        weights_hash=weights_hash(state_dict),
        layers=cfg.num_states,
        preprocessing=preprocessing_name(modality, normalization, num_frames),
        image_size=image_size,
    )


def check_fingerprint(manifest_fp: dict | None, expected_fp: dict) -> None:
    """Raise ValueError naming every field where the shards' features differ from the model's."""
    if manifest_fp is None:
        raise ValueError("the shards carry no cached features (manifest fingerprint is null)")
    keys = sorted(set(manifest_fp) | set(expected_fp))
    diffs = [
        f"{k}: shards={manifest_fp.get(k, '<absent>')!r} expected={expected_fp.get(k, '<absent>')!r}"
        for k in keys
        if manifest_fp.get(k) != expected_fp.get(k)
    ]
    if diffs:
        raise ValueError(
            "cached-feature fingerprint mismatch; rebuild the shards or fix the config:\n  "
            + "\n  ".join(diffs)
        )


def weights_hash(state_dict: dict) -> str:
    """sha256 over a module's tensors (names sorted, dtype and shape included), 16 hex digits."""
    from epalm.digest import state_digest

    return state_digest(state_dict, algorithm="sha256", layout=True)[:16]
