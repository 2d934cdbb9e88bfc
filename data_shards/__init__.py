"""Offline shard building: annotation sources in their real formats -> WebDataset tar shards + manifest."""
