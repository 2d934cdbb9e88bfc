"""Benchmark scorers that reproduce the official VQA v2, COCO caption and open-ended QA numbers."""
