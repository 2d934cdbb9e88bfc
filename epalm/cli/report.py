"""Write a run directory's report.md (+ loss.png, eval_metric.png) again, from its own files:

    python -m epalm.cli.report RUN_DIR [--config-name vqa_v2_pt_L]

Bad input (not a directory, a directory without any run file, a run file that cannot be parsed) ends in
one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from epalm.cli.common import HelpFormatter, configure_logging, fail
from epalm.evaluation.report import write_report
from epalm.run import layout

RUN_FILES = (layout.CONFIG, layout.METRICS, layout.SUMMARY, f"{layout.EVAL}/{layout.SCORES}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m epalm.cli.report", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("run_dir", type=Path, help="a training run's run_dir (config.yaml, metrics.jsonl, ...)")
    p.add_argument(
        "--config-name", help="paper-table key (none given: the run_dir name in the run's config.yaml)"
    )
    args = p.parse_args(argv)
    configure_logging()
    if not args.run_dir.is_dir():
        return fail(f"{args.run_dir} is not a directory")
    if not any((args.run_dir / name).is_file() for name in RUN_FILES):
        return fail(
            f"{args.run_dir} holds none of a run's files ({', '.join(RUN_FILES)}); not a run directory"
        )
    try:
        print(write_report(args.run_dir, args.config_name))
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return fail(f"{args.run_dir}: a run file cannot be parsed: {' '.join(str(e).split())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
