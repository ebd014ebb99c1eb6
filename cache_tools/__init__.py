"""The cache shard format: write, read, verify, inspect."""
