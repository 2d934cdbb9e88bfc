"""Convert an original eP-ALM release (connector + prompt weights) into an adapter export directory:

    python -m epalm.cli.official --checkpoint checkpoint_best.pth --config launch/configs/image/vqa_v2.yaml --out DIR

The key conversion is `epalm.model.official`'s; see docs/model.md for the releases.
"""

from __future__ import annotations

import argparse

from epalm.model.official import load_official_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", required=True, help="the YAML of the matching setting")
    parser.add_argument("--out", required=True, help="directory for the adapter export")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)

    from epalm.model.epalm import build_model
    from epalm.preflight import load_run_config
    from epalm.run.adapter import save_adapter

    cfg = load_run_config(args.config, args.overrides, paths=False)
    model = build_model(cfg.model, device="meta")
    state = load_official_checkpoint(args.checkpoint)
    problems = model.adapter_state_problems(state)
    if problems:
        raise SystemExit(f"checkpoint does not match {args.config}: {problems}")
    save_adapter(state, cfg, args.out)
    print(f"wrote {args.out} ({sum(v.numel() for v in state.values())} parameters)")


if __name__ == "__main__":
    main()
