"""Answer a question about (or caption) one image, video or audio file with a trained adapter:

    python -m epalm.cli.generate --adapter DIR --image cat.jpg [--question "what is this?"]
    python -m epalm.cli.generate --adapter DIR --video clip.mp4 --question "what happens?"
    python -m epalm.cli.generate --adapter DIR --audio sound.wav
    python -m epalm.cli.generate --adapter DIR --image cat.jpg --do-sample --top-k 50 --seed 1   # as the original's v1

It goes through the Python API (`epalm.api.Predictor`): media through the same code as shard building and
evaluation, so the model sees what it saw in eval. Many files at once: `python -m epalm.cli.infer`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from epalm.cli.common import HelpFormatter, configure_logging, fail

if TYPE_CHECKING:
    import torch

    from epalm.api import Predictor


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    """The decoding flags (`epalm.api.DECODING_OPTIONS`); an unset flag is absent from the parsed args, so
    the adapter config's `eval` section decides it (`Predictor.decoding`)."""
    unset = argparse.SUPPRESS
    g = p.add_argument_group("decoding (default: the adapter config's eval section)")
    g.add_argument("--num-beams", type=int, default=unset, help="beams (1: greedy); default: eval.num_beams")
    g.add_argument("--max-new-tokens", type=int, default=unset, help="default: eval.max_new_tokens")
    g.add_argument(
        "--do-sample",
        action=argparse.BooleanOptionalAction,
        default=unset,
        help="sample instead of beam search (implies --num-beams 1); default: eval.do_sample",
    )
    g.add_argument(
        "--temperature", type=float, default=unset, help="sampling temperature; default: eval.temperature"
    )
    g.add_argument(
        "--top-k",
        type=int,
        default=unset,
        help="sample among the k most likely tokens (0: all); default: eval.top_k",
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=unset,
        help="sample among the fewest tokens holding this mass; default: eval.top_p",
    )
    g.add_argument(
        "--seed", type=int, default=unset, help="sampling seed (reproducible output); default: eval.seed"
    )


def decoding_options(args: argparse.Namespace) -> dict:
    """The decoding flags given on the command line, as `Predictor.ask` / `caption` keywords."""
    from epalm.api import DECODING_OPTIONS

    return {k: getattr(args, k) for k in DECODING_OPTIONS if hasattr(args, k)}


def load_predictor(adapter: Path, overrides: list[str], device: str | torch.device | None) -> Predictor:
    """`Predictor.load`, with every way an adapter fails to load raised as one ValueError naming it."""
    from safetensors import SafetensorError

    from epalm.api import Predictor

    try:
        return Predictor.load(adapter, device=device, overrides=overrides)
    # no dir, weights or tokenizer; a bad override; a features-only adapter
    except (OSError, ValueError) as e:
        problem = str(e)
    # a corrupt weights file, or weights that do not fit the config's model: an unreadable export
    except (SafetensorError, KeyError, RuntimeError) as e:
        problem = f"unreadable adapter export ({type(e).__name__}: {e})"
    # on one line: a ConfigError lists its problems one per line
    raise ValueError(f"--adapter {adapter}: {' '.join(problem.split())}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m epalm.cli.generate", description=__doc__, formatter_class=HelpFormatter
    )
    unset = argparse.SUPPRESS  # no "(default: None)" in --help where there is none to show
    p.add_argument(
        "--adapter",
        required=True,
        type=Path,
        default=unset,
        help="adapter export directory (adapter.safetensors + config.yaml), or a Hub id org/name[@revision]",
    )
    media = p.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", type=Path, default=unset, help="any file PIL reads")
    media.add_argument("--video", type=Path, default=unset, help="any file PyAV (FFmpeg) decodes")
    media.add_argument(
        "--audio", type=Path, default=unset, help="any file soundfile reads (wav, flac); resampled to 16 kHz"
    )
    p.add_argument("--question", default=unset, help="ask this (QA); default: none, the model captions")
    add_decoding_arguments(p)
    p.add_argument("--device", default=unset, help="default: cuda when available, else cpu")
    p.add_argument(
        "overrides",
        nargs="*",
        default=unset,
        help="config overrides key=value, applied to the adapter's config",
    )
    args = p.parse_args(argv)
    configure_logging()

    from epalm.data.media import SkipSample

    given, path = next((m, getattr(args, m)) for m in ("image", "video", "audio") if hasattr(args, m))
    if not path.is_file():
        return fail(f"{path}: no such file")
    try:
        predictor = load_predictor(
            args.adapter, getattr(args, "overrides", []), getattr(args, "device", None)
        )
    except ValueError as e:
        return fail(str(e))
    if given != predictor.modality:
        kind = predictor.cfg.model.encoder.kind
        return fail(f"this adapter's encoder ({kind}) takes {predictor.modality}, not {given}")
    options = decoding_options(args)
    try:
        if getattr(args, "question", None):
            text = predictor.ask(path, args.question, **options)
        else:
            text = predictor.caption(path, **options)
    except SkipSample as e:
        return fail(f"{path}: {e}")
    except ValueError as err:  # a sampling setting out of range, or sampling with beams
        return fail(str(err))
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
