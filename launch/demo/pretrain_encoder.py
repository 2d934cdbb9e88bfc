"""The demo's unimodal encoder pretraining: a tiny timm ViT learns to classify the *train* split's digit images.

This stands in for the paper's premise, an encoder pretrained on images alone (ImageNet for the real
ViT): it sees train-split images with their class index from scikit-learn, never a question, an
answer string or a held-out image. eP-ALM then freezes it like any pretrained encoder.

    python launch/demo/pretrain_encoder.py --raw demo_out/raw/digits --out demo_out/encoder/vit_digits.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from epalm.data.transforms import ImageTransform

# timm overrides of the demo ViT; launch/configs/demo/*.yaml use the same ones.
DEMO_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)


def load_train_split(raw: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) and digit labels of the Karpathy-format train split only."""
    from sklearn.datasets import load_digits

    targets = load_digits().target
    entries = json.loads((raw / "dataset_coco.json").read_text())["images"]
    train = [e for e in entries if e["split"] == "train"]
    images = [np.asarray(Image.open(raw / e["filepath"] / e["filename"]).convert("RGB")) for e in train]
    labels = [int(targets[e["imgid"]]) for e in train]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def main(argv: list[str] | None = None) -> None:
    import timm
    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw", type=Path, required=True, help="the demo's raw/digits directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    images, labels = load_train_split(args.raw)
    # the loader's eval transform (resize + CLIP normalisation), once: no augmentation needed here
    pixels = ImageTransform(size=DEMO_VIT["img_size"], train=False)(images)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, **DEMO_VIT)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    start = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(labels))
        correct = 0
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            logits = model(pixels[idx])
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(-1) == labels[idx]).sum())
        print(f"encoder epoch {epoch + 1}/{args.epochs}: train accuracy {100 * correct / len(labels):.1f}%")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out))
    print(f"wrote {args.out} ({len(labels)} train images, {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
