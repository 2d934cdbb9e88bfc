"""Evaluation: decoding, predict / gather / score / write over eval shards, the official reference files,
the trainer's in-training hook and the run report."""
