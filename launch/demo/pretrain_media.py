"""The demo's video and audio encoder pretraining: a tiny TimeSformer (or AST) learns to classify the *train*
split's clips by the generator's class (direction of the moving square, pitch band of the tone).

The analogue of launch/demo/pretrain_encoder.py for the other two modalities (Kinetics / AudioSet
pretraining for the real encoders): it reads the train shards' media only, with labels from the data
generator (data_shards.demo), never a question, answer, caption or held-out clip. The encoder is saved
with `save_pretrained`, so the run config loads it like any hub encoder (encoder.pretrained: true).

    python launch/demo/pretrain_media.py --kind timesformer --shards demo_out/shards/shapes_qa/train --out demo_out/encoder/timesformer_shapes
    python launch/demo/pretrain_media.py --kind ast --shards demo_out/shards/tones_caption/train --out demo_out/encoder/ast_tones
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data_shards import demo
from epalm.data import schema
from epalm.data.collate import decode_frames, decode_npy
from epalm.data.stream import iter_range, load_manifest
from epalm.data.transforms import AudioTransform, ImageTransform

# transformers config overrides of the demo encoders; launch/configs/demo/*.yaml load the saved models.
# Joint space-time attention (one of TimeSformer's own attention_type options) learns the direction from
# 160 clips in ~30 epochs; the divided default stayed near chance (val 45-50% after 30 epochs).
DEMO_TIMESFORMER = dict(
    image_size=32, patch_size=8, num_frames=8, hidden_size=64, num_hidden_layers=3,
    num_attention_heads=4, intermediate_size=128, attention_type="joint_space_time",
)  # fmt: skip
# Chosen on the val split (--val): learning rate, epochs. 2e-3 left both encoders near chance.
SETTINGS = {"timesformer": {"lr": 5e-4, "epochs": 30}, "ast": {"lr": 5e-4, "epochs": 20}}
DEMO_AST = dict(
    patch_size=16, frequency_stride=16, time_stride=32, max_length=1024, num_mel_bins=128,
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
)  # fmt: skip


def load_media(kind: str, shards: Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-transformed media of every sample of one split's shards and the generator's class index."""
    manifest, shard_list = load_manifest(shards)
    if manifest.get("split") != split:
        raise ValueError(f"{shards}: split {manifest.get('split')!r}, expected {split!r}")
    pieces = [(i, 0, n) for i, n in enumerate(shard_list.counts)]
    image, audio = ImageTransform(size=DEMO_TIMESFORMER["image_size"]), AudioTransform()
    media, labels = [], []
    for _, sample in iter_range(shard_list, pieces, lambda ext: True):
        meta = json.loads(sample.members[schema.JSON])
        if kind == "timesformer":
            media.append(image(decode_frames(sample.members)))
            labels.append(demo.shape_direction(meta["video_id"]))
        else:
            media.append(audio(torch.from_numpy(decode_npy(sample.members[schema.AUDIO]).astype("float32"))))
            labels.append(demo.tone_pitch(meta["audio_id"]))
    return torch.stack(media), torch.tensor(labels)


def main(argv: list[str] | None = None) -> None:
    from transformers import (
        ASTConfig,
        ASTForAudioClassification,
        TimesformerConfig,
        TimesformerForVideoClassification,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=("timesformer", "ast"), required=True)
    p.add_argument("--shards", type=Path, required=True, help="the train split's shard directory")
    p.add_argument("--out", type=Path, required=True, help="directory for save_pretrained")
    p.add_argument("--val", type=Path, help="the val split's shards: accuracy reported, never trained on")
    p.add_argument("--epochs", type=int, help="default: SETTINGS[kind]")
    p.add_argument("--lr", type=float, help="default: SETTINGS[kind]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    epochs = args.epochs or SETTINGS[args.kind]["epochs"]
    torch.manual_seed(args.seed)
    media, labels = load_media(args.kind, args.shards)
    num_labels = int(labels.max()) + 1
    if args.kind == "timesformer":
        model = TimesformerForVideoClassification(
            TimesformerConfig(num_labels=num_labels, **DEMO_TIMESFORMER)
        )
        base = model.timesformer
        # HF starts the time (and space) embeddings at zero: attention then cannot tell frame order, and
        # the direction of motion is invisible until they move. Start them random instead.
        for emb in (base.embeddings.time_embeddings, base.embeddings.position_embeddings):
            torch.nn.init.normal_(emb, std=0.5)
    else:
        model = ASTForAudioClassification(ASTConfig(num_labels=num_labels, **DEMO_AST))
        base = model.audio_spectrogram_transformer
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr or SETTINGS[args.kind]["lr"], weight_decay=0.05)
    start = time.time()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels))
        correct = 0
        for i in range(0, len(order), 16):
            idx = order[i : i + 16]
            logits = model(media[idx]).logits
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(-1) == labels[idx]).sum())
        print(f"{args.kind} epoch {epoch + 1}/{epochs}: train accuracy {100 * correct / len(labels):.1f}%")
    if args.val:
        model.eval()
        val_media, val_labels = load_media(args.kind, args.val, split="val")
        with torch.no_grad():
            hits = sum(
                int((model(val_media[i : i + 32]).logits.argmax(-1) == val_labels[i : i + 32]).sum())
                for i in range(0, len(val_labels), 32)
            )
        print(f"{args.kind} val accuracy {100 * hits / len(val_labels):.1f}% ({len(val_labels)} clips)")
    base.save_pretrained(args.out)
    print(f"wrote {args.out} ({len(labels)} train clips, {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
