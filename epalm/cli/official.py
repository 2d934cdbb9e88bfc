"""Convert an original eP-ALM release (connector + prompt weights) into an adapter export directory:

    python -m epalm.cli.official --checkpoint checkpoint_best.pth --config launch/configs/image/vqa_v2.yaml --out DIR

The key conversion is `epalm.model.official`'s; see docs/model.md for the releases. Bad input (a missing or
unreadable checkpoint, a config or override that does not load, a checkpoint that does not fit the config,
an --out that cannot be written) ends in one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from epalm.cli.common import HelpFormatter, configure_logging, fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m epalm.cli.official", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="the release's .pth (state dict) or .safetensors")
    parser.add_argument("--config", required=True, help="the YAML of the matching setting")
    parser.add_argument("--out", required=True, help="directory for the adapter export")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    configure_logging()

    from safetensors import SafetensorError

    from epalm.config import ConfigError
    from epalm.model.epalm import build_model
    from epalm.model.official import load_official_checkpoint
    from epalm.preflight import load_run_config
    from epalm.run.adapter import save_adapter

    try:
        cfg = load_run_config(args.config, args.overrides, paths=False)
    except ConfigError as e:
        return fail(str(e))
    try:
        state = load_official_checkpoint(args.checkpoint)
    except (OSError, ValueError, SafetensorError) as e:  # missing, unreadable, pickled objects, unknown keys
        return fail(f"--checkpoint {args.checkpoint}: {e}")
    problems = build_model(cfg.model, device="meta").adapter_state_problems(state)
    if problems:
        return fail(f"checkpoint {args.checkpoint} does not fit {args.config}: {'; '.join(problems)}")
    try:
        save_adapter(state, cfg, args.out)
    except OSError as e:
        return fail(f"--out {args.out}: cannot write the adapter export: {e}")
    print(f"wrote {args.out} ({sum(v.numel() for v in state.values())} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
