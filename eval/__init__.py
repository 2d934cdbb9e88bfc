"""Command-line scorers over epalm.metrics: `python -m eval.vqa|caption|qa --help`."""
