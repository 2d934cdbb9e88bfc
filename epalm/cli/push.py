"""Upload an adapter export to the Hugging Face Hub with a model card:

    python -m epalm.cli.push runs/vqa_v2/adapter --repo org/epalm-vqa-v2 [--run-dir runs/vqa_v2] [--private]
    python -m epalm.cli.push runs/vqa_v2/best --repo org/epalm-vqa-v2 --dry-run /tmp/upload   # no network

The card (README.md) holds YAML metadata (library, tags, base models, datasets, model-index results read from
the run's best.json, metrics.jsonl and eval/scores.json), the trainable and total parameter counts, usage and
the paper's citation; the adapter directory itself is not changed. The upload is huggingface_hub's
(`create_repo` + `upload_folder`), with its token (`hf auth login` or HF_TOKEN). Loading it back:
`--adapter org/name[@revision]` wherever an adapter is taken (docs/model.md, "Sharing adapters on the Hub").
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from epalm.cli.common import HelpFormatter, configure_logging, fail

log = logging.getLogger("epalm.cli.push")


def _run_dir(adapter: Path, given: str | None) -> Path | None:
    """--run-dir, else the adapter's parent when it is a run directory (runs/x/adapter, runs/x/best)."""
    from epalm.run.layout import METRICS

    if given:
        return Path(given)
    return adapter.parent if (adapter.parent / METRICS).is_file() else None


def _local_paths(cfg, adapter: Path) -> list[str]:
    """The frozen parts the config names by a path outside the export: they will not exist elsewhere."""
    m = cfg.model
    values = [m.lm.name, m.lm.tokenizer, m.encoder.checkpoint]
    values += [m.encoder.name] if m.encoder.kind != "vit" else []
    inside = adapter.resolve()
    return [v for v in values if v and Path(v).is_absolute() and not Path(v).is_relative_to(inside)]


def stage(adapter: Path, card: str, out: Path) -> Path:
    """`out` holding the adapter's files and README.md (the card): the folder that is uploaded."""
    shutil.copytree(adapter, out, dirs_exist_ok=True)
    (out / "README.md").write_text(card)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m epalm.cli.push", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("adapter", type=Path, help="adapter export directory (adapter.safetensors + config.yaml)")
    p.add_argument("--repo", required=True, help="Hub model repo id, org/name")
    p.add_argument(
        "--run-dir",
        help="training run whose metrics go into the card (default: the adapter's parent, if a run)",
    )
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default="main", help="branch to upload to (created if missing)")
    p.add_argument(
        "--dry-run", type=Path, metavar="DIR", help="write the upload folder (files + card) to DIR only"
    )
    args = p.parse_args(argv)
    configure_logging()

    from epalm.run.hub import build_model_card, parse_hub_id, upload_adapter
    from epalm.run.layout import ADAPTER_WEIGHTS

    if parse_hub_id(args.repo) is None or "@" in args.repo:
        return fail(f"--repo {args.repo}: expected a Hub repo id org/name (use --revision for a branch)")
    if not (args.adapter / ADAPTER_WEIGHTS).is_file():
        return fail(f"{args.adapter}: no {ADAPTER_WEIGHTS}; not an adapter export directory")
    run_dir = _run_dir(args.adapter, args.run_dir)
    if run_dir is not None and not run_dir.is_dir():
        return fail(f"--run-dir {run_dir}: no such directory")
    if args.dry_run is not None and args.dry_run.exists() and any(args.dry_run.iterdir()):
        return fail(f"--dry-run {args.dry_run}: exists and is not empty")

    from epalm.run.adapter import load_adapter

    try:
        state, cfg = load_adapter(args.adapter)
    except (OSError, ValueError) as e:  # unreadable config (ConfigError is a ValueError), weights
        return fail(f"{args.adapter}: {e}")
    for path in _local_paths(cfg, args.adapter):
        log.warning(
            "config.yaml names %s, outside the export: the pushed adapter will not load without it", path
        )
    card = build_model_card(state, cfg, args.repo, run_dir)
    if args.dry_run is not None:
        print(
            f"wrote {stage(args.adapter, card, args.dry_run)} (README.md + adapter files); nothing uploaded"
        )
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = stage(args.adapter, card, Path(tmp) / "upload")
        try:
            url = upload_adapter(folder, args.repo, revision=args.revision, private=args.private)
        except OSError as e:  # huggingface_hub's HTTP errors are OSErrors: no token, no access, no network
            print(f"error: upload to {args.repo} failed: {e}", file=sys.stderr)
            return 1
    print(f"pushed {args.adapter} to {args.repo} ({args.revision}): {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
