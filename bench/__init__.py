"""Benchmarks behind `make bench`; each module's `main()` returns a markdown section for docs/benchmarks.md."""
