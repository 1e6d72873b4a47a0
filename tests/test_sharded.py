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
    assert len(make()) == 38  # ceil(600 / 16): only the epoch's last batch is short

    first = make()
    before = _ids(first, workers=2, stop_after=17)
    state = StreamState.from_json(json.loads(json.dumps(first.state.as_json())))  # through the checkpoint's JSON
    assert state.window_rows == 112  # window_rows rounded up to whole batches, kept with the state
    after = _ids(ShardStream(source, seed=3, epoch=0, rank=0, world=1, batch_size=16, window_rows=999, state=state),
                 workers=2)  # the setting changed between attempts: the state's windows still apply
    assert len(before) + len(after) == 600 and sorted(before + after, key=int) == [str(i) for i in range(600)]
    assert make(epoch=1, state=state).state.partial == {}  # a state of another epoch starts that epoch afresh


def test_the_switch_a_small_sharded_set_loads_whole_and_files_above_the_cap_are_refused(tmp_path):
    from workers.data import load_dataset

    x, y = _digits()
    write_parquet_shards(tmp_path / "small", x[:300], y[:300], shards=3)
    np.savez(tmp_path / "big.npz", x=x, y=y)

    def load(uri: str, cap: int):
        settings = Settings(home=tmp_path / "home", data_roots=str(tmp_path), max_inmemory_bytes=cap)
        return load_dataset(uri, label_column=None, dest_dir=tmp_path / "in", settings=settings,
                            lookup=lambda u: u, copy=lambda key, path: None)

    data = load(f"file://{tmp_path}/small/manifest.json", cap=300 * ROW_BYTES)  # fits: the in-memory Dataset
    assert data.x.shape == (300, 64) and data.feature_names == [f"f{j}" for j in range(64)]
    assert sorted(data.y.tolist()) == sorted(y[:300].tolist())
    for uri in (f"file://{tmp_path}/small/", f"file://{tmp_path}/big.npz"):  # one byte short / a file above it
        with pytest.raises(JobFailure) as failure:
            load(uri, cap=300 * ROW_BYTES - 1 if "small" in uri else 100_000)
        assert failure.value.code == "dataset_too_large" and "REFINERY_MAX_INMEMORY_BYTES" in failure.value.message


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


# --- jobs over HTTP on a platform with a memory cap ---------------------------------------------------------------

@pytest.fixture(scope="module")
def capped(redis_client, tmp_path_factory):
    """API + worker with REFINERY_MAX_INMEMORY_BYTES=CAP and the streamed-row log on, on their own database and
    queue (the session platform's sweeper and worker never see these jobs). Data: digits as 12 Parquet shards with a
    manifest, the first 1397 digits images as 8 WebDataset tars (the next 200 as a validation .npz), and a folder
    with one damaged Parquet shard."""
    root = tmp_path_factory.mktemp("sharded-data")
    x, y = _digits()
    write_parquet_shards(root / "digits_pq", x, y, shards=12)
    write_tar_shards(root / "digits_wds", x[:1397], y[:1397], shards=8)
    np.savez(root / "digits_val.npz", x=x[1397:1597].reshape(-1, 1, 8, 8), y=y[1397:1597])
    names = write_parquet_shards(root / "damaged", x, y, shards=10, manifest=False)
    (root / "damaged" / names[6]).write_bytes(b"PAR1" + os.urandom(300))
    home = tmp_path_factory.mktemp("capped-home")
    with fresh_database() as url:
        env = dict(os.environ, REFINERY_HOME=str(home), REFINERY_DATABASE_URL=url, REFINERY_BROKER_URL=REDIS_URL,
                   REFINERY_QUEUE=f"{QUEUE}.sharded", REFINERY_STORAGE_URL=f"file://{home / 'store'}",
                   REFINERY_BOOTSTRAP_TOKEN=TOKEN, REFINERY_DATA_ROOTS=str(root), REFINERY_PORT=str(free_port()),
                   REFINERY_LEASE_SECONDS="3", REFINERY_HEARTBEAT_SECONDS="0.5", REFINERY_CHECKPOINT_SECONDS="1",
                   REFINERY_REDISPATCH_SECONDS="2", REFINERY_SWEEP_SECONDS="0.5",
                   REFINERY_RATE_LIMIT_PER_MINUTE="100000", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   REFINERY_MAX_INMEMORY_BYTES=str(CAP), REFINERY_STREAM_ROW_LOG=str(home / "rows"),
                   REFINERY_WORKER_CLASSES="cpu,cpu-x2")
        p = Platform(env, home)
        p.start_api()
        p.start_worker()
        p.data = root
        try:
            yield p
        finally:
            p.stop()
            redis_client.delete(f"{QUEUE}.sharded")


def _row_log(platform: Platform, job_id: str, attempt: int, rank: int = 0) -> list[tuple[int, int, list[str]]]:
    path = platform.home / "rows" / f"{job_id}-attempt-{attempt}{f'-rank-{rank}' if rank else ''}.log"
    return [(int(e), int(s), ids) for e, s, *ids in (line.split() for line in path.read_text().splitlines())]


def test_a_parquet_dataset_five_times_the_cap_streams_through_a_kill_with_every_row_once_per_epoch(capped):
    assert 1797 * ROW_BYTES >= 5 * CAP
    epochs = 2
    job = capped.submit({"method": "train", "dataset": {"uri": f"file://{capped.data}/digits_pq/"},
                         "model": {"arch": "mlp"}, "params": {"epochs": epochs, "batch_size": 2},
                         "budget": {"max_seconds": 300}, "seed": 4})
    # SIGKILL the worker just after a checkpoint taken well inside an epoch (50+ steps in, not at its end).
    deadline, killed = time.time() + 120, None
    while time.time() < deadline and killed is None:
        events = capped.events(job["id"])
        loaded = next((e for e in events if e["type"] == "data.loaded"), None)
        for event in events:
            if event["type"] == "checkpoint.saved" and loaded and \
                    event["data"]["step"] % -(-loaded["data"]["train_rows"] // 2) >= 50:
                capped.kill_worker()
                killed = event["data"]["step"]
                break
        time.sleep(0.1)
    assert killed is not None, capped.worker_log()[-3000:]
    assert loaded["data"]["streamed"] is True
    capped.start_worker()
    done = capped.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    resumed = next(e for e in capped.events(job["id"]) if e["type"] == "job.resumed")["data"]["step"]
    report = capped.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    steps_per_epoch = -(-report["dataset"]["train_rows"] // 2)
    assert resumed >= killed and resumed % steps_per_epoch, (resumed, steps_per_epoch)  # resumed mid-epoch
    assert report["dataset"]["streamed"] and report["training"]["steps"] == epochs * steps_per_epoch

    # The rows each attempt trained on: attempt 1 up to the checkpoint attempt 2 resumed from, then attempt 2.
    manifest = json.loads((capped.data / "digits_pq" / "manifest.json").read_text())
    held_out = report["dataset"]["validation_shards"]
    expected = Counter(str(i) for shard in manifest["shards"] if shard["path"] not in held_out
                       for i in pq.read_table(capped.data / "digits_pq" / shard["path"]).column("row_id").to_pylist())
    first, second = _row_log(capped, job["id"], 1), _row_log(capped, job["id"], 2)
    assert second[0][1] == resumed  # no step skipped or replayed at the seam
    trained = [line for line in first if line[1] < resumed] + second
    assert [step for _, step, _ in trained] == list(range(epochs * steps_per_epoch))
    for epoch in range(epochs):
        seen = Counter(i for e, _, ids in trained if e == epoch for i in ids)
        assert seen == expected, f"epoch {epoch}: {sum(seen.values())} rows, {len(set(seen))} distinct"
    assert sum(expected.values()) == report["dataset"]["train_rows"] and len(held_out) == 1
    assert done["result"]["metrics"]["accuracy"] > 0.8


def test_two_ranks_stream_disjoint_rows_that_cover_the_training_set(capped):
    """resources.devices 2: each gloo rank streams its own contiguous slice of the epoch (README: Sharded datasets)."""
    job = capped.submit({"method": "train", "dataset": {"uri": f"file://{capped.data}/digits_pq/"},
                         "model": {"arch": "mlp"}, "params": {"epochs": 2, "batch_size": 32},
                         "budget": {"max_seconds": 300}, "seed": 5, "resources": {"devices": 2}})
    done = capped.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", (done, capped.worker_log()[-3000:])
    report = capped.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    rows = report["dataset"]["train_rows"]
    ranks = [_row_log(capped, job["id"], 1), _row_log(capped, f"{job['id']}", 1, rank=1)]
    assert [step for _, step, _ in ranks[0]] == [step for _, step, _ in ranks[1]]  # in step
    for epoch in range(2):
        seen = [Counter(i for e, _, ids in lines if e == epoch for i in ids) for lines in ranks]
        assert sum(seen[0].values()) == sum(seen[1].values()) == rows // 2
        assert not set(seen[0]) & set(seen[1]) and max((seen[0] + seen[1]).values()) == 1
    assert report["training"]["steps"] == 2 * -(-(rows // 2) // 16)
    assert done["result"]["metrics"]["accuracy"] > 0.8


def test_webdataset_tar_shards_train_end_to_end_and_the_model_scores_in_onnx_runtime(capped):
    x, y = _digits()
    job = capped.submit({"method": "train", "dataset": {"uri": f"file://{capped.data}/digits_wds/",
                                                        "validation": {"uri": f"file://{capped.data}/digits_val.npz"}},
                         "model": {"arch": "mlp"}, "params": {"epochs": 8, "batch_size": 32, "lr": 3e-3},
                         "budget": {"max_seconds": 300}, "seed": 1})
    done = capped.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", done
    report = capped.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["dataset"]["streamed"] and report["dataset"]["format"] == "webdataset"
    assert report["dataset"]["input_shape"] == [1, 8, 8] and report["dataset"]["train_shards"] == 8
    assert report["dataset"]["train_rows"] == 1397 and report["dataset"]["validation_rows"] == 200
    card = capped.http.get(f"/v1/jobs/{job['id']}/artifacts/model.json").json()
    assert card["input_shape"] == [1, 8, 8]
    onnx = capped.http.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    accuracy = onnx_accuracy(onnx, x[1597:].reshape(-1, 1, 8, 8), y[1597:])  # 200 digits never seen
    assert accuracy > 0.85, accuracy


def test_a_damaged_shard_fails_the_job_with_bad_shard_naming_it(capped):
    job = capped.submit({"method": "train", "dataset": {"uri": f"file://{capped.data}/damaged",
                                                        "label_column": "label"},
                         "model": {"arch": "mlp"}, "budget": {"max_seconds": 60}})
    done = capped.wait(job["id"], timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "bad_shard", done
    assert "part-000006.parquet" in done["error"]["message"]


def test_shards_on_s3_stream_through_worker_processes(tmp_path):
    """s3:// through fsspec/s3fs against moto's S3 server on loopback, read by a DataLoader worker process."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import fsspec
    import fsspec.config

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    saved = {k: os.environ.get(k) for k in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(FSSPEC_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test")
    fsspec.config.set_conf_env(fsspec.config.conf)
    try:
        x, y = _digits()
        write_tar_shards(tmp_path / "wds", x[:300], y[:300], shards=3)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("sharded-test")
        fs.put(str(tmp_path / "wds") + "/", "sharded-test/digits/", recursive=True)
        source = open_sharded("s3://sharded-test/digits/", _settings(tmp_path), label_column=None)
        assert source.format == "webdataset" and source.rows == 300 and source.input_shape == (1, 8, 8)
        assert source.classes == [str(i) for i in range(10)]  # from the indexing pass over the .cls members
        stream = ShardStream(source, seed=0, epoch=0, rank=0, world=1, batch_size=25, window_rows=100)
        assert sorted(_ids(stream, workers=1)) == [f"{i:06d}" for i in range(300)]
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        fsspec.config.conf.pop("s3", None)
