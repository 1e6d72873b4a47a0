"""The REST contract over HTTP against a running API on Postgres + Redis: auth, errors, validation, idempotency,
pagination, project isolation, uploads, the methods catalog, health and metrics."""
import concurrent.futures
import uuid

import httpx
import pytest

DIGITS = {"method": "train", "dataset": {"uri": "builtin://digits"}, "budget": {"max_seconds": 60},
          "params": {"epochs": 1}}


def test_health_readiness_and_openapi(platform):
    assert httpx.get(platform.base + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(platform.base + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": True, "broker": True}
    spec = httpx.get(platform.base + "/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events",
                 "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/artifacts", "/v1/jobs/{job_id}/artifacts/{name}",
                 "/v1/files", "/v1/methods"):
        assert path in spec["paths"], path


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer rfy_not_a_key"}, {"Authorization": "Basic x"}])
def test_every_v1_route_needs_a_valid_key(platform, headers):
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/methods"), ("GET", "/v1/files"),
                         ("GET", "/v1/jobs/job_x/events")):
        r = httpx.request(method, platform.base + path, headers=headers, json={})
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("spec,param", [
    ({}, "method"),
    ({"method": "transmogrify", "dataset": {"uri": "builtin://digits"}}, "method"),
    ({"method": "train", "dataset": {"uri": 123}}, "dataset.uri"),
    ({"method": "train", "dataset": {"uri": "ftp://example.org/x.npz"}}, "dataset.uri"),
    ({"method": "train", "dataset": {"uri": "builtin://digits", "validation": {"fraction": 1.5}}},
     "dataset.validation.fraction"),
    ({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"lr": -1}}, "params.lr"),
    ({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"bogus": 1}}, "params.bogus"),
    ({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": "forever"}}, "params.epochs"),
    ({"method": "train", "algorithm": "quantum", "dataset": {"uri": "builtin://digits"}}, "algorithm"),
    ({"method": "train", "dataset": {"uri": "builtin://digits"}, "budget": {"max_seconds": 10**9}},
     "budget.max_seconds"),
    ({"method": "train", "dataset": {"uri": "builtin://digits"}, "budget": {"max_seconds": 0}}, "budget.max_seconds"),
    ({"method": "train", "dataset": {"uri": "builtin://digits"}, "surprise": True}, "surprise"),
])
def test_bad_specs_are_422_naming_the_field(platform, spec, param):
    r = platform.http.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error


def test_job_object_shape_and_defaults(platform):
    job = platform.submit({**DIGITS, "metadata": {"team": "search"}})
    assert job["id"].startswith("job_") and job["object"] == "job" and job["status"] == "queued"
    assert job["algorithm"] == "supervised" and job["spec"]["params"]["lr"] == 0.001
    assert job["budget"] == {"max_seconds": 60, "used_seconds": 0.0, "max_epochs": None, "max_steps": None}
    assert job["metadata"] == {"team": "search"} and job["attempt"] == 1
    default_budget = platform.submit({"method": "train", "dataset": {"uri": "builtin://digits"},
                                      "params": {"epochs": 1}})
    assert default_budget["budget"]["max_seconds"] == 600


def test_idempotency_same_body_same_job_other_body_409(platform):
    key = f"idem-{uuid.uuid4()}"
    first = platform.http.post("/v1/jobs", json=DIGITS, headers={"Idempotency-Key": key})
    again = platform.http.post("/v1/jobs", json=DIGITS, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"] and again.headers.get("idempotent-replayed") == "true"
    other = platform.http.post("/v1/jobs", json={**DIGITS, "seed": 7}, headers={"Idempotency-Key": key})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_fifty_concurrent_posts_with_one_key_make_one_job(platform):
    key = f"race-{uuid.uuid4()}"
    spec = {**DIGITS, "metadata": {"race": key}}

    def post(_):
        with httpx.Client(base_url=platform.base, headers=platform.headers, timeout=60) as c:
            return c.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, range(50)))
    assert all(r.status_code == 201 for r in responses), {r.status_code for r in responses}
    assert len({r.json()["id"] for r in responses}) == 1
    listed = platform.http.get("/v1/jobs", params={"metadata[race]": key}).json()["data"]
    assert len(listed) == 1


def test_list_pagination_and_filters(platform):
    tag = uuid.uuid4().hex
    ids = [platform.submit({**DIGITS, "metadata": {"batch": tag}})["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        params = {"limit": 2, "metadata[batch]": tag, **({"after": after} if after else {})}
        page = platform.http.get("/v1/jobs", params=params).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == sorted(ids, reverse=True)
    trains = platform.http.get("/v1/jobs", params={"method": "train", "limit": 100}).json()["data"]
    assert trains and all(j["method"] == "train" for j in trains)
    assert platform.http.get("/v1/jobs", params={"method": "distill"}).json()["data"] == []
    assert platform.http.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_other_projects_objects_are_404_everywhere(platform, other_project_headers):
    job = platform.submit(DIGITS)
    upload = platform.http.post("/v1/files", files={"file": ("d.csv", b"a,b\n1,0\n")}).json()
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", f"/v1/jobs/{job['id']}/metrics",
                 f"/v1/jobs/{job['id']}/artifacts", f"/v1/jobs/{job['id']}/artifacts/model.onnx",
                 f"/v1/files/{upload['id']}"):
        theirs = httpx.get(platform.base + path, headers=other_project_headers)
        missing = httpx.get(platform.base + path.replace(job["id"], "job_0").replace(upload["id"], "file_0"),
                            headers=other_project_headers)
        assert theirs.status_code == 404, path
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    cancel = httpx.post(f"{platform.base}/v1/jobs/{job['id']}/cancel", headers=other_project_headers)
    assert cancel.status_code == 404
    assert platform.job(job["id"])["cancel_requested"] is False
    listed = httpx.get(platform.base + "/v1/jobs", headers=other_project_headers).json()["data"]
    assert job["id"] not in {j["id"] for j in listed}


def test_file_upload_and_size_limit(platform):
    body = b"x" * 1000
    r = platform.http.post("/v1/files", files={"file": ("../../etc/evil name.npz", body)}, data={"purpose": "dataset"})
    assert r.status_code == 201, r.text
    f = r.json()
    assert f["id"].startswith("file_") and f["bytes"] == 1000 and f["filename"] == "evil_name.npz"
    got = platform.http.get(f"/v1/files/{f['id']}")
    assert got.status_code == 200 and got.json()["sha256"] == f["sha256"], got.text
    too_big = platform.http.post("/v1/files", files={"file": ("big.npz", b"0" * 3_500_000)})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit must hold while streaming, too
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n\r\n'
        for _ in range(40):
            yield b"0" * 100_000
    streamed = platform.http.post("/v1/files", content=chunks(),
                                  headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert streamed.status_code == 413


def test_methods_catalog_publishes_json_schemas(platform):
    methods = platform.http.get("/v1/methods").json()["data"]
    train = next(m for m in methods if m["name"] == "train")
    schema = train["algorithms"][0]["params_schema"]
    assert train["default_algorithm"] == "supervised"
    assert {"epochs", "lr", "batch_size", "optimizer", "weight_decay", "label_smoothing"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_prometheus_metrics(platform):
    platform.submit(DIGITS)
    text = httpx.get(platform.base + "/metrics").text
    assert 'refinery_jobs{status="queued"}' in text or 'refinery_jobs{status="succeeded"}' in text
    assert "refinery_queue_depth" in text


def test_database_down_is_a_503_not_a_500(tmp_path):
    """An API whose database does not answer (nothing listens on its port) still starts, stays live, says it is not
    ready, and answers requests that need the database with a retryable 503."""
    import os

    from tests.conftest import Platform, free_port
    env = dict(os.environ, REFINERY_HOME=str(tmp_path), REFINERY_PORT=str(free_port()),
               REFINERY_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing",
               REFINERY_RUN_SWEEPER="false", REFINERY_BOOTSTRAP_TOKEN="rfy_x")
    api = Platform(env, tmp_path)
    api.start_api()
    try:
        assert httpx.get(api.base + "/readyz", timeout=30).status_code == 503
        r = httpx.get(api.base + "/v1/jobs", headers={"Authorization": "Bearer rfy_x"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
        assert r.headers["retry-after"]
    finally:
        api.stop()


def test_method_not_allowed_names_every_method_the_path_takes(platform):
    response = platform.http.delete("/v1/jobs")  # GET and POST /v1/jobs are two routes
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "POST"}


def test_the_admission_gate_bounds_requests_inside_and_frees_a_place_when_the_response_starts():
    import asyncio

    from api.limits import AdmissionGate

    inside, most, streams = 0, 0, asyncio.Event()

    async def app(scope, receive, send):
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        await asyncio.sleep(0.02)  # a request's database work
        inside -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/stream":
            await streams.wait()  # a live stream: its place is already free
        await send({"type": "http.response.body", "body": b"ok"})

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=AdmissionGate(app, limit=3))
        async with httpx.AsyncClient(transport=transport, base_url="http://gate") as client:
            streaming = [asyncio.create_task(client.get("/stream")) for _ in range(3)]
            await asyncio.sleep(0.1)
            statuses = [r.status_code for r in await asyncio.gather(*(client.get("/") for _ in range(30)))]
            streams.set()
            await asyncio.gather(*streaming)
            return statuses

    assert asyncio.run(run()) == [200] * 30  # three open streams did not block the thirty
    assert most == 3
