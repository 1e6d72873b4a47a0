"""Streaming a sharded dataset epoch by epoch: a seeded shard-then-buffer shuffle, split across DDP ranks and
DataLoader worker processes, with a resume state that says exactly which batches an epoch has already trained on.

One epoch of rank r of `world` ranks:
  1. The shards are put in an order drawn from (seed, epoch) and their rows concatenated into one sequence.
  2. Rank r takes the r-th of `world` equal contiguous slices of that sequence (total // world rows each; the
     total % world rows at its end sit this epoch out, so every rank takes the same number of steps; with one
     rank nothing is left out). Ranks read disjoint rows, mostly from disjoint shards.
  3. The slice is cut into windows of `window_rows` consecutive rows (the shuffle buffer, a multiple of the batch
     size); each window's rows are permuted by a generator seeded with (seed, epoch, rank, window) and cut into
     batches. Batch b of window w is therefore a pure function of the seed, the epoch and the shard list.
  4. DataLoader workers take contiguous blocks of windows (so each shard is mostly read by one worker, once).

The resume state is, per epoch, the windows whose batches have all been trained on and how many leading batches of
the others have been: a resumed attempt skips exactly those, whatever order the workers delivered them in."""
import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from workers.data.streaming.shards import ShardRows
from workers.data.streaming.source import ShardedSource
from workers.errors import JobFailure


@dataclass(frozen=True)
class Piece:
    shard: int  # index into the source's shard list
    start: int  # rows [start, stop) of that shard
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def epoch_pieces(rows: list[int], *, seed: int, epoch: int, rank: int, world: int) -> list[Piece]:
    """Steps 1 and 2 above: the pieces of shards rank `rank` reads in `epoch`, in reading order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    per_rank = sum(rows) // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    pieces, offset = [], 0
    for shard in order.tolist():
        start, stop = max(lo, offset), min(hi, offset + rows[shard])
        if start < stop:
            pieces.append(Piece(shard, start - offset, stop - offset))
        offset += rows[shard]
    return pieces


def cut_windows(pieces: list[Piece], window_rows: int) -> list[list[Piece]]:
    """Step 3's windows: consecutive runs of `window_rows` rows (the last may be shorter), as pieces."""
    windows: list[list[Piece]] = [[]]
    room = window_rows
    for piece in pieces:
        start = piece.start
        while start < piece.stop:
            take = min(room, piece.stop - start)
            windows[-1].append(Piece(piece.shard, start, start + take))
            start += take
            room -= take
            if room == 0:
                windows.append([])
                room = window_rows
    return [w for w in windows if w]


@dataclass
class StreamState:
    """Which batches of `epoch` have been trained on: every batch of windows below `complete_below`, and the first
    `partial[w]` batches of window w, windows being `window_rows` long. JSON-able, kept in the checkpoint's meta."""
    epoch: int
    window_rows: int
    complete_below: int = 0
    partial: dict[int, int] = field(default_factory=dict)

    def done_in(self, window: int) -> int | None:
        """Batches of `window` already trained on; None when all of them are."""
        return None if window < self.complete_below else self.partial.get(window, 0)

    def record(self, window: int, batch: int, batches_in: Callable[[int], int]) -> None:
        """Batch `batch` of `window` has been trained on (each window's batches arrive in order)."""
        self.partial[window] = batch + 1
        while self.partial.get(self.complete_below) == batches_in(self.complete_below):
            del self.partial[self.complete_below]
            self.complete_below += 1

    def as_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "window_rows": self.window_rows, "complete_below": self.complete_below,
                "partial": {str(w): n for w, n in sorted(self.partial.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StreamState":
        return cls(epoch=int(data["epoch"]), window_rows=int(data["window_rows"]),
                   complete_below=int(data["complete_below"]),
                   partial={int(w): int(n) for w, n in data.get("partial", {}).items()})


@dataclass
class Batch:
    window: int
    index: int  # within the window
    x: torch.Tensor
    y: torch.Tensor
    ids: list[str]


@dataclass
class StreamError:
    """A worker process's JobFailure, sent as data: the DataLoader cannot re-raise exceptions with extra fields."""
    code: str
    message: str


class ShardStream(IterableDataset):
    """One rank's epoch of batches (numpy, converted to tensors by the DataLoader), skipping what `state` says was
    already trained on. Each DataLoader worker yields the batches of its own block of windows."""

    def __init__(self, source: ShardedSource, *, seed: int, epoch: int, rank: int, world: int, batch_size: int,
                 window_rows: int, state: StreamState | None = None):
        super().__init__()
        self.source, self.seed, self.epoch, self.rank, self.batch_size = source, seed, epoch, rank, batch_size
        if state is not None and state.epoch == epoch:
            window_rows = state.window_rows  # resuming: the windows the state counts in, whatever the setting is now
        else:
            # A whole number of batches per window: only the epoch's last batch may be short.
            state = StreamState(epoch, max(1, -(-window_rows // batch_size)) * batch_size)
        self.state, self.window_rows = state, state.window_rows
        rows = [shard.rows for shard in source.shards]
        self.windows = cut_windows(epoch_pieces(rows, seed=seed, epoch=epoch, rank=rank, world=world), self.window_rows)

    def batches_in(self, window: int) -> int:
        if window >= len(self.windows):
            return -1  # past the last window: never complete, so StreamState.record stops there
        return -(-sum(len(p) for p in self.windows[window]) // self.batch_size)

    def __len__(self) -> int:
        """Batches of the whole epoch (before skipping)."""
        return sum(self.batches_in(w) for w in range(len(self.windows)))

    def record(self, batch: "Batch") -> None:
        """Call once the batch has been trained on: a checkpoint taken after this resumes past it."""
        self.state.record(batch.window, batch.index, self.batches_in)

    def batches_done(self) -> int:
        return sum(self.batches_in(w) if self.state.done_in(w) is None else self.state.done_in(w)
                   for w in range(len(self.windows)))

    def _my_windows(self) -> range:
        info = get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        n = len(self.windows)
        return range(me * n // workers, (me + 1) * n // workers)

    def __iter__(self) -> Iterator[tuple | StreamError]:
        cache: dict[int, ShardRows] = {}  # the shards this worker read last: consecutive windows share them
        try:
            for w in self._my_windows():
                done = self.state.done_in(w)
                if done is None or done >= self.batches_in(w):
                    continue
                x, y, ids = self._window_rows(self.windows[w], cache)
                order = np.random.default_rng([self.seed, self.epoch, self.rank, w]).permutation(len(y))
                for b in range(done, self.batches_in(w)):
                    take = order[b * self.batch_size:(b + 1) * self.batch_size]
                    yield w, b, x[take], y[take], [ids[i] for i in take]
        except JobFailure as failure:
            yield StreamError(failure.code, failure.message)

    def _window_rows(self, pieces: list[Piece], cache: dict[int, ShardRows]) -> tuple[np.ndarray, np.ndarray, list]:
        xs, ys, ids = [], [], []
        for piece in pieces:
            if piece.shard not in cache:
                if len(cache) >= 2:
                    cache.pop(next(iter(cache)))
                cache[piece.shard] = self.source.read(self.source.shards[piece.shard])
            rows = cache[piece.shard]
            xs.append(rows.x[piece.start:piece.stop])
            ys.append(rows.y[piece.start:piece.stop])
            ids.extend(rows.ids[piece.start:piece.stop])
        return np.concatenate(xs), np.concatenate(ys), ids


def stream_epoch(stream: ShardStream, workers: int) -> Iterator[Batch]:
    """The epoch's remaining batches through a DataLoader with `workers` processes (0: read in this process). The
    caller records each batch in `stream.state` once it has trained on it."""
    # Forked, not spawned, even inside a spawned DDP rank: a spawned reader re-imports torch each epoch (seconds),
    # and readers only decode numpy arrays, never touching CUDA or the process group they inherit.
    context = multiprocessing.get_context("fork") if workers and "fork" in multiprocessing.get_all_start_methods() \
        else None
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                        persistent_workers=False, multiprocessing_context=context)
    for item in loader:
        if isinstance(item, StreamError):
            raise JobFailure(item.code, item.message)
        window, index, x, y, ids = item
        yield Batch(int(window), int(index), x.float(), y.long(), list(ids))
