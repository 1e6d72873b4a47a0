"""Sharded datasets larger than memory: Parquet or WebDataset tar shards listed by a folder or a manifest.json,
streamed with a seeded shard-then-buffer shuffle that a checkpoint can resume mid-epoch (README "Sharded datasets")."""
from workers.data.streaming.shards import Shard, ShardRows
from workers.data.streaming.source import MANIFEST, ShardedSource, is_sharded, open_sharded
from workers.data.streaming.stream import Batch, ShardStream, StreamState, cut_windows, epoch_pieces, stream_epoch

__all__ = ["MANIFEST", "Batch", "Shard", "ShardRows", "ShardStream", "ShardedSource", "StreamState", "cut_windows",
           "epoch_pieces", "is_sharded", "open_sharded", "stream_epoch"]
