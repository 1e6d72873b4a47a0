"""The artifact store on S3, the production path: fsspec/s3fs against moto's S3 server on loopback (S3 itself cannot
exist here). Same ArtifactStore code as the local directory."""
import hashlib
import os

import pytest

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from core.storage import ArtifactStore  # noqa: E402
from tests.conftest import free_port  # noqa: E402


@pytest.fixture(scope="module")
def s3_store():
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    old = {k: os.environ.get(k) for k in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(FSSPEC_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test")
    import fsspec
    import fsspec.config
    fsspec.config.set_conf_env(fsspec.config.conf)  # pick up FSSPEC_S3_* like a fresh process would
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("refinery-test")
    try:
        yield ArtifactStore("s3://refinery-test/artifacts")
    finally:
        server.stop()
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_content_addressed_put_ranges_and_checkpoints_on_s3(s3_store, tmp_path):
    payload = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "model.onnx"
    path.write_bytes(payload)
    key, sha, size = s3_store.put_file(str(path))
    assert sha == hashlib.sha256(payload).hexdigest() and size == len(payload) and key.endswith(sha)
    assert s3_store.put_file(str(path))[0] == key  # same bytes, same key, stored once
    assert b"".join(s3_store.iter_range(key, 0, size - 1)) == payload
    assert b"".join(s3_store.iter_range(key, 1_000_000, 2_500_000)) == payload[1_000_000:2_500_001]
    copy = tmp_path / "copy"
    s3_store.copy_to(key, str(copy))
    assert copy.read_bytes() == payload
    s3_store.write_bytes("checkpoints/job_x/latest.json", b"{}")
    assert s3_store.read_bytes("checkpoints/job_x/latest.json") == b"{}"
    s3_store.delete_prefix("checkpoints/job_x")
    assert s3_store.read_bytes("checkpoints/job_x/latest.json") is None


def test_presigned_url_serves_the_object_directly(s3_store, tmp_path):
    """REFINERY_S3_PRESIGNED_DOWNLOADS answers with this URL: the client reads the bytes (ranges too) from S3 itself."""
    import httpx

    payload = os.urandom(2 * 1024 * 1024 + 5)
    path = tmp_path / "big.bin"
    path.write_bytes(payload)
    key, _, _ = s3_store.put_file(str(path))
    url = s3_store.presigned_url(key, 60)
    assert "Signature" in url or "X-Amz-Signature" in url
    assert httpx.get(url).content == payload
    assert httpx.get(url, headers={"Range": "bytes=10-19"}).content == payload[10:20]
    assert s3_store.local_path(key) is None


def test_a_local_store_has_paths_and_no_presigned_urls(tmp_path):
    store = ArtifactStore(f"file://{tmp_path / 'store'}")
    source = tmp_path / "a.bin"
    source.write_bytes(b"abc")
    key, _, _ = store.put_file(str(source))
    assert open(store.local_path(key), "rb").read() == b"abc"
    assert store.presigned_url(key, 60) is None


def test_presigned_downloads_answer_307_to_the_object(s3_store, tmp_path):
    """With REFINERY_S3_PRESIGNED_DOWNLOADS the API's download answer is a redirect, ETag kept, and the bytes come from
    S3. The ledger is a real (SQLite, migrated) database holding the job and artifact rows."""
    import time

    import httpx

    from api.artifacts.service import download_response
    from core.settings import Settings
    from db.migrate import upgrade
    from db.models import Artifact, Job, Project
    from db.session import get_sessionmaker

    payload = os.urandom(1024 * 1024 + 3)
    (tmp_path / "model.onnx").write_bytes(payload)
    key, sha, size = s3_store.put_file(str(tmp_path / "model.onnx"))
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    settings = Settings(home=tmp_path, database_url=url, storage_url="s3://refinery-test/artifacts",
                        s3_presigned_downloads=True)
    with get_sessionmaker(url)() as session:
        session.add(Project(id="proj_s3", name="s3", created_at=time.time()))
        session.flush()
        job = Job(id="job_s3", project_id="proj_s3", status="succeeded", method="train", algorithm="sgd", spec={},
                  metadata_={}, created_at=time.time(), attempt=1, max_attempts=3, cancel_requested=False,
                  progress={}, max_seconds=600, used_seconds=0.0, dispatches=0)
        session.add(job)
        session.flush()
        session.add(Artifact(id="art_s3", job_id=job.id, name="model.onnx", size=size, sha256=sha,
                             content_type="application/octet-stream", storage_key=key, created_at=time.time()))
        session.flush()
        response = download_response(session, settings, job, "model.onnx", None, None)
        assert response.status_code == 307 and response.headers["etag"] == f'"{sha}"'
        assert httpx.get(response.headers["location"]).content == payload
        assert download_response(session, settings, job, "model.onnx", None, f'"{sha}"').status_code == 304
        off = settings.model_copy(update={"s3_presigned_downloads": False})
        assert download_response(session, off, job, "model.onnx", None, None).status_code == 200
