"""`make bench`: run every benchmark module and rewrite docs/benchmarks.md with their sections.

Each module in MODULES has `main() -> str`, returning a markdown section that starts with a
`## ` heading and names the exact command behind its numbers. `python -m bench.run NAME ...` runs
only some of them and replaces just their sections.
"""

from __future__ import annotations

import importlib
import platform
import re
import sys
from pathlib import Path

MODULES = [
    "generation",
    "decoding",
    "builder",
    "loader",
    "zero",
    "features",
    "mfu",
    "preemption",
    "extract",
    "eval_padding",
    "infer",
]
# only when named: scale ~20 min (hours without AVX512-BF16), ~20 GB RAM, 14 GB disk; setup ~10 min, 13 GB disk
OPT_IN = ["scale", "setup"]
OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nWritten by `make bench` (`python -m bench.run`). Machine: {machine}.\n"


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"(?m)^(?=<!-- bench:)", text)
    out = {}
    for part in parts:
        m = re.match(r"<!-- bench:(\w+) -->", part)
        if m:
            out[m.group(1)] = part.rstrip() + "\n"
    return out


def main(argv: list[str] | None = None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or MODULES
    sections = _sections(OUT.read_text()) if OUT.exists() else {}
    for name in names:
        print(f"bench: running {name} ...", flush=True)
        body = importlib.import_module(f"bench.{name}").main()
        sections[name] = f"<!-- bench:{name} -->\n{body.rstrip()}\n"
        print(body, flush=True)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}"
    known = MODULES + OPT_IN
    ordered = [sections[n] for n in known if n in sections] + [
        v for k, v in sections.items() if k not in known
    ]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(HEADER.format(machine=machine) + "\n" + "\n".join(ordered))
    print(f"bench: wrote {OUT}")


if __name__ == "__main__":
    main()
