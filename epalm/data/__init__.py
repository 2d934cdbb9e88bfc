"""Data: the shard schema shared with `data_shards`, transforms, text formats and the streaming loader."""
