"""Command-line scorers over epalm.metrics: `python -m eval.vqa|caption|qa --help`, and `eval.run`. From a
checkout the package is `eval`; installed it is `epalm_eval` (pyproject.toml: `eval` is too generic a
top-level name to claim), so modules here import each other relatively."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from epalm.cli.common import fail
from epalm.metrics.vqa import MetricsInputError


def prog(module: str) -> str:
    """The name `--help` shows: the console script as typed, else `python -m <this package>.<module>`."""
    script = Path(sys.argv[0]).name
    return script if script.startswith("epalm-") else f"python -m {__name__}.{module}"


def run_scorer(compute: Callable[[], dict], out: Path | None) -> int:
    """Shared CLI tail: print the scores as JSON (and write them to `out`); bad input -> message, exit 2."""
    try:
        scores = compute()
    except MetricsInputError as e:
        return fail(str(e))
    text = json.dumps(scores, indent=2)
    print(text)
    if out:
        try:
            out.write_text(text + "\n")
        except OSError as e:
            return fail(f"--out {out}: cannot write: {e.strerror or e}")
    return 0
