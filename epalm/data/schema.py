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
