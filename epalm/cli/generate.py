"""Answer a question about (or caption) one image, video or audio file with a trained adapter:

    python -m epalm.cli.generate --adapter DIR --image cat.jpg [--question "what is this?"]
    python -m epalm.cli.generate --adapter DIR --video clip.mp4 --question "what happens?"
    python -m epalm.cli.generate --adapter DIR --audio sound.wav
    python -m epalm.cli.generate --adapter DIR --image cat.jpg --do-sample --top-k 50 --seed 1   # as the original's v1

Media go through the same code as shard building and evaluation, so the model sees what it saw in eval.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epalm.cli.generate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--adapter", required=True, type=Path, help="adapter export dir (adapter.safetensors + config.yaml)"
    )
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", type=Path)
    media.add_argument("--video", type=Path)
    media.add_argument("--audio", type=Path, help="any file soundfile reads (wav, flac); resampled to 16 kHz")
    p.add_argument("--question", help="ask this (QA); without it the model captions")
    p.add_argument("--num-beams", type=int, help="default: the config's eval.num_beams")
    p.add_argument("--max-new-tokens", type=int, help="default: the config's eval.max_new_tokens")
    p.add_argument(
        "--do-sample",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample instead of beam search (implies --num-beams 1); default: the config's eval.do_sample",
    )
    p.add_argument("--temperature", type=float, help="sampling temperature; default: eval.temperature")
    p.add_argument(
        "--top-k", type=int, help="sample among the k most likely tokens (0: all); default: eval.top_k"
    )
    p.add_argument(
        "--top-p", type=float, help="sample among the fewest tokens holding this mass; default: eval.top_p"
    )
    p.add_argument("--seed", type=int, help="sampling seed (reproducible output); default: eval.seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)

    from epalm.config import ENCODER_MODALITY
    from epalm.data.media import SkipSample
    from epalm.data.media_input import load_media
    from epalm.data.text import format_caption, format_qa, tokenize
    from epalm.evaluation.decoding import Decoding, decode_generated, generate
    from epalm.evaluation.predict import load_eval_model

    path = args.image or args.video or args.audio
    if not path.is_file():
        print(f"error: {path}: no such file", file=sys.stderr)
        return 2
    model, tokenizer, cfg = load_eval_model(args.adapter, args.overrides, args.device)
    if model.encoder is None:
        print(
            "error: this adapter was trained on cached features; set data.use_features=false", file=sys.stderr
        )
        return 2
    given = "image" if args.image else "video" if args.video else "audio"
    expected = ENCODER_MODALITY[cfg.model.encoder.kind]
    if given != expected:
        print(
            f"error: this adapter's encoder ({cfg.model.encoder.kind}) takes {expected}, not {given}",
            file=sys.stderr,
        )
        return 2
    try:
        pixels = load_media(cfg, args.image, args.video, args.audio)
    except SkipSample as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    eos = tokenizer.eos_token
    text = (
        format_qa(args.question, None, eos, cfg.model.double_question_mark)
        if args.question
        else format_caption(None, eos)
    )
    input_ids, attention_mask = tokenize(tokenizer, [text], padding_side="left")
    ev = cfg.eval
    do_sample = ev.do_sample if args.do_sample is None else args.do_sample
    seed = ev.seed if args.seed is None else args.seed
    pick = lambda given, default: default if given is None else given  # noqa: E731
    try:
        tokens = generate(
            model,
            input_ids.to(args.device),
            attention_mask.to(args.device),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            media=pixels.to(args.device),
            decoding=Decoding.from_config(
                ev,
                num_beams=args.num_beams or (1 if do_sample else ev.num_beams),
                max_new_tokens=args.max_new_tokens or ev.max_new_tokens,
                do_sample=do_sample,
                temperature=pick(args.temperature, ev.temperature),
                top_k=pick(args.top_k, ev.top_k),
                top_p=pick(args.top_p, ev.top_p),
            ),
            generator=None if seed is None else torch.Generator(device=args.device).manual_seed(seed),
        )
    except ValueError as err:  # a sampling setting out of range, or sampling with beams
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(decode_generated(tokenizer, tokens)[0])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
