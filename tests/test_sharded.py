"""Sharded datasets larger than memory (workers.data.streaming): the seeded shard-then-buffer shuffle and its resume
state, bad shards, and jobs over HTTP on a platform whose REFINERY_MAX_INMEMORY_BYTES the test sets: Parquet shards
streamed through a SIGKILL mid-epoch with every row counted, and WebDataset tar shards scored in ONNX Runtime."""
import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from core.settings import Settings
from tests.conftest import QUEUE, REDIS_URL, TOKEN, Platform, free_port, fresh_database, onnx_accuracy
from workers.data.streaming import ShardStream, StreamState, cut_windows, epoch_pieces, open_sharded, stream_epoch
from workers.errors import JobFailure

# The platform's memory cap: digits as 64 float32 features is ~470 kB decoded, 5.8x this.
CAP = 80_000
ROW_BYTES = 64 * 4 + 8


def _digits():
    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def write_parquet_shards(folder: Path, x: np.ndarray, y: np.ndarray, shards: int, manifest: bool = True) -> list[str]:
    """Digits rows as `shards` Parquet files with columns f0..f63, label and row_id (not a feature)."""
    folder.mkdir(parents=True, exist_ok=True)
    names, entries = [], []
    for i, rows in enumerate(np.array_split(np.arange(len(y)), shards)):
        table = pa.table({**{f"f{j}": x[rows, j] for j in range(x.shape[1])}, "label": y[rows],
                          "row_id": rows.astype(np.int64)})
        name = f"part-{i:06d}.parquet"
        pq.write_table(table, folder / name)
        names.append(name)
        entries.append({"path": name, "rows": len(rows),
                        "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"format": "parquet", "label_column": "label",
                                                          "id_column": "row_id", "shards": entries}))
    return names


def write_tar_shards(folder: Path, x: np.ndarray, y: np.ndarray, shards: int, drop_cls: int | None = None) -> None:
    """WebDataset layout: NNNNNN.npy ([1, 8, 8] float32) + NNNNNN.cls per sample, `shards` tars, no manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(np.array_split(np.arange(len(y)), shards)):
        with tarfile.open(folder / f"shard-{i:06d}.tar", "w") as tar:
            for row in rows:
                buffer = io.BytesIO()
                np.save(buffer, x[row].reshape(1, 8, 8))
                members = {"npy": buffer.getvalue(), "cls": str(int(y[row])).encode()}
                if row == drop_cls:
                    del members["cls"]
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{row:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _settings(root: Path) -> Settings:
    return Settings(home=root / "home", data_roots=str(root))


# --- the shuffle and its resume state -----------------------------------------------------------------------------

def test_epoch_pieces_cover_every_row_once_split_across_ranks_and_seeded():
    rows = [7, 13, 1, 20, 9]
    for world in (1, 2, 3):
        seen = Counter()
        per_rank = []
        for rank in range(world):
            pieces = epoch_pieces(rows, seed=5, epoch=2, rank=rank, world=world)
            per_rank.append(sum(len(p) for p in pieces))
            seen.update((p.shard, r) for p in pieces for r in range(p.start, p.stop))
        assert set(per_rank) == {sum(rows) // world}  # equal steps on every rank
        assert max(seen.values()) == 1 and len(seen) == sum(rows) // world * world  # disjoint, remainder left out
    assert epoch_pieces(rows, seed=5, epoch=2, rank=0, world=1) == epoch_pieces(rows, seed=5, epoch=2, rank=0, world=1)
    orders = {tuple(p.shard for p in epoch_pieces(rows, seed=5, epoch=e, rank=0, world=1)) for e in range(6)}
    assert len(orders) > 1  # a new shard order each epoch
    windows = cut_windows(epoch_pieces(rows, seed=1, epoch=0, rank=0, world=1), 8)
    assert [sum(len(p) for p in w) for w in windows] == [8] * 6 + [2]


def _batches(stream: ShardStream, workers: int, stop_after: int | None = None) -> list[tuple[str, ...]]:
    """The row ids of each batch the stream yields, recording each as trained on; `stop_after` batches, the next
    one is fetched but not trained on (what a SIGKILL between two checkpoints leaves)."""
    batches = []
    for n, batch in enumerate(stream_epoch(stream, workers)):
        if stop_after is not None and n == stop_after:
            break
        batches.append(tuple(batch.ids))
        stream.record(batch)
    return batches


def _ids(stream: ShardStream, workers: int, stop_after: int | None = None) -> list[str]:
    return [i for batch in _batches(stream, workers, stop_after) for i in batch]


def test_stream_is_a_seeded_permutation_and_resumes_without_revisiting_or_skipping(tmp_path):
    x, y = _digits()
    x, y = x[:600], y[:600]
    write_parquet_shards(tmp_path / "ds", x, y, shards=7)
    source = open_sharded(f"file://{tmp_path}/ds/", _settings(tmp_path), label_column=None)
    assert source.rows == 600 and source.input_shape == (64,) and source.feature_names == [f"f{j}" for j in range(64)]

    def make(epoch=0, state=None):
        return ShardStream(source, seed=3, epoch=epoch, rank=0, world=1, batch_size=16, window_rows=100, state=state)

    full = _ids(make(), workers=0)
    assert sorted(full, key=int) == [str(i) for i in range(600)]  # every row once: the id column, not a feature
    assert full != [str(i) for i in range(600)] and full == _ids(make(), workers=0)  # shuffled, seeded
    # Two worker processes interleave their blocks of windows: the same batches, in another order.
    assert sorted(_batches(make(), workers=2)) == sorted(_batches(make(), workers=0))
    assert _ids(make(epoch=1), workers=0) != full
    assert len(make()) == 38  # ceil(600 / 16): windows are rounded up to whole batches (112 rows)

    first = make()
    before = _ids(first, workers=2, stop_after=17)
    state = StreamState.from_json(json.loads(json.dumps(first.state.as_json())))  # through the checkpoint's JSON
    after = _ids(make(state=state), workers=2)
    assert len(before) + len(after) == 600 and sorted(before + after, key=int) == [str(i) for i in range(600)]
    assert make(epoch=1, state=state).state.partial == {}  # a state of another epoch starts that epoch afresh


def test_bad_shards_fail_with_a_code_naming_the_shard(tmp_path):
    x, y = _digits()
    settings = _settings(tmp_path)
    names = write_parquet_shards(tmp_path / "pq", x[:200], y[:200], shards=4, manifest=False)
    (tmp_path / "pq" / names[2]).write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(JobFailure) as failure:
        open_sharded(f"file://{tmp_path}/pq", settings, label_column="label")
    assert failure.value.code == "bad_shard" and names[2] in failure.value.message

    write_tar_shards(tmp_path / "tar", x[:60], y[:60], shards=3, drop_cls=45)
    with pytest.raises(JobFailure) as failure:  # reading every shard finds a .npy with no .cls
        open_sharded(f"file://{tmp_path}/tar/", settings, label_column=None).load_all()
    assert failure.value.code == "bad_shard" and "shard-000002.tar" in failure.value.message
    assert "000045" in failure.value.message and ".cls" in failure.value.message

    labels = y[:100].copy()
    labels[75] = 12  # in the second shard, which only the stream reads: the manifest gives rows and classes
    write_parquet_shards(tmp_path / "labels", x[:100], labels, shards=2)
    manifest = json.loads((tmp_path / "labels" / "manifest.json").read_text())
    manifest["classes"] = [str(i) for i in range(10)]
    (tmp_path / "labels" / "manifest.json").write_text(json.dumps(manifest))
    source = open_sharded(f"file://{tmp_path}/labels/manifest.json", settings, label_column=None)
    stream = ShardStream(source, seed=0, epoch=0, rank=0, world=1, batch_size=10, window_rows=50)
    with pytest.raises(JobFailure) as failure:  # found by a DataLoader worker, raised in the training process
        _ids(stream, workers=1)
    assert failure.value.code == "bad_shard" and "label 12" in failure.value.message
    assert manifest["shards"][1]["path"] in failure.value.message

    manifest["shards"][1]["sha256"] = "0" * 64
    (tmp_path / "labels" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(JobFailure) as failure:
        open_sharded(f"file://{tmp_path}/labels/", settings, label_column=None).load_all()
    assert failure.value.code == "bad_shard" and manifest["shards"][1]["path"] in failure.value.message
