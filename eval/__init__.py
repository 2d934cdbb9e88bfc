"""Command-line scorers over epalm.metrics: `python -m eval.vqa|caption|qa --help`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from epalm.metrics.vqa import MetricsInputError


def run_scorer(compute: Callable[[], dict], out: Path | None) -> int:
    """Shared CLI tail: print the scores as JSON (and write them to `out`); bad input -> message, exit 2."""
    try:
        scores = compute()
    except MetricsInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(scores, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
    return 0
