"""The library's command-line entry points, each a thin `main(argv)` over the library (`python -m epalm.cli.X`,
or the console scripts pyproject.toml declares)."""
