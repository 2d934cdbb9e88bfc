"""Write a run directory's report.md (+ loss.png, eval_metric.png) again, from its own files:

python -m epalm.cli.report RUN_DIR [--config-name vqa_v2_pt_L]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epalm.evaluation.report import write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epalm.cli.report", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--config-name", help="paper-table key (default: the run_dir name in config.yaml)")
    args = p.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    print(write_report(args.run_dir, args.config_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
