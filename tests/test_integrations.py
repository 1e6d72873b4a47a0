"""Integrations as a user meets them: a finished job exported to a real `mlflow server` (SQLite backend, artifacts
served over HTTP) and read back with MlflowClient; /metrics read from the ledger, and the Grafana dashboard that
queries it; the `refinery export mlflow`, `open` and `logs` commands and their SDK calls."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from api.errors import APIError
from api.integrations.service import MAX_PARAM_VALUE, check_tracking_uri, final_metrics, flatten_params
from client import Refinery, RefineryError
from core.settings import Settings
from tests.conftest import ROOT, free_port, onnx_accuracy

EPOCHS = 4
CHART = ROOT / "helm" / "refinery"


@pytest.fixture(scope="module")
def mlflow_process(tmp_path_factory):
    """`mlflow server` as an operator runs it: a SQLite backend store and a local artifacts destination that the
    server proxies over HTTP (--serve-artifacts is the default). Started here, waited for in `mlflow_url`, so its
    start-up overlaps the training job."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--backend-store-uri",
                             f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            # No background job runner (a second process importing MLflow): only tracking is tested.
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    yield proc, f"http://127.0.0.1:{port}", root
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and the uvicorn process it runs
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def trained(platform, data_root, mlflow_process):
    job = platform.submit({"method": "train", "model": {"arch": "mlp"}, "params": {"epochs": EPOCHS, "lr": 0.01},
                           "dataset": {"uri": f"file://{data_root}/digits_train.npz"}, "budget": {"max_seconds": 120},
                           "seed": 0, "metadata": {"team": "integrations"}})
    done = platform.wait(job["id"])
    assert done["status"] == "succeeded", done["error"]
    return done


@pytest.fixture(scope="module")
def mlflow_url(mlflow_process, trained):
    proc, url, root = mlflow_process
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("mlflow server exited: " + (root / "server.log").read_text()[-3000:])
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("mlflow server did not answer /health: " + (root / "server.log").read_text()[-3000:])


def export(platform, job_id: str, **body):
    return platform.http.post(f"/v1/jobs/{job_id}/export/mlflow", json=body)


def test_export_reads_back_as_an_mlflow_run(platform, trained, mlflow_url, data_root, tmp_path):
    from mlflow.tracking import MlflowClient

    started = time.monotonic()
    response = export(platform, trained["id"], tracking_uri=mlflow_url, experiment_name="refinery-tests",
                      run_name="digits-mlp")
    seconds = time.monotonic() - started
    assert response.status_code == 201, response.text
    out = response.json()
    assert out["object"] == "mlflow_export" and out["job_id"] == trained["id"] and out["tracking_uri"] == mlflow_url
    assert out["run_url"] == f"{mlflow_url}/#/experiments/{out['experiment_id']}/runs/{out['run_id']}"
    print(f"export of a {EPOCHS}-epoch job: {seconds:.2f} s")

    client = MlflowClient(tracking_uri=mlflow_url)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == out["experiment_id"]
    assert client.get_experiment(out["experiment_id"]).name == "refinery-tests"
    assert run.info.start_time == int(trained["started_at"] * 1000)
    assert run.info.end_time == int(trained["finished_at"] * 1000)
    params, spec = run.data.params, trained["spec"]
    assert params["method"] == "train" and params["algorithm"] == "supervised" and params["seed"] == "0"
    assert params["params.lr"] == "0.01" and params["params.epochs"] == str(EPOCHS)
    assert params["dataset.uri"] == spec["dataset"]["uri"] and params["model.arch"] == "mlp"
    assert params["budget.max_seconds"] == "120" and params["metadata.team"] == "integrations"
    assert params["params.batch_size"] == json.dumps(spec["params"]["batch_size"]).strip('"')
    assert run.data.tags["mlflow.runName"] == run.info.run_name == "digits-mlp"
    assert {k: run.data.tags[k] for k in ("refinery.method", "refinery.algorithm", "refinery.job_id",
                                          "refinery.status")} == {
        "refinery.method": "train", "refinery.algorithm": "supervised", "refinery.job_id": trained["id"],
        "refinery.status": "succeeded"}
    assert run.data.tags["refinery.dashboard_url"].endswith(f"/ui/jobs/{trained['id']}")

    # Every series with its steps, as GET /v1/jobs/{id}/metrics has it: one point per epoch.
    series = platform.http.get(f"/v1/jobs/{trained['id']}/metrics").json()["data"]
    assert {s["name"] for s in series} >= {"train_loss", "val_loss", "val_accuracy", "lr"}
    for s in series:
        history = sorted((m.step, m.value) for m in client.get_metric_history(out["run_id"], s["name"]))
        assert history == [(p["step"], pytest.approx(p["value"])) for p in s["points"]], s["name"]
    assert [m.step for m in client.get_metric_history(out["run_id"], "train_loss")] == list(range(1, EPOCHS + 1))
    result = trained["result"]["metrics"]
    assert run.data.metrics["accuracy"] == pytest.approx(result["accuracy"])
    assert run.data.metrics["params"] == result["params"] and run.data.metrics["flops"] == result["flops"]
    recall = result["per_class_recall"]
    some_class = next(iter(recall)) if isinstance(recall, dict) else 0
    assert run.data.metrics[f"per_class_recall.{some_class}"] == pytest.approx(recall[some_class])

    # The artifacts, listed and downloaded from MLflow as a user would, and the model scored in ONNX Runtime.
    assert sorted(out["artifacts"]) == ["model.json", "model.onnx", "report.json"]
    assert sorted(a.path for a in client.list_artifacts(out["run_id"])) == ["model.json", "model.onnx", "report.json"]
    onnx_path = client.download_artifacts(out["run_id"], "model.onnx", str(tmp_path))
    test = np.load(data_root / "digits_test.npz")
    accuracy = onnx_accuracy(Path(onnx_path).read_bytes(), test["x"], test["y"])
    assert accuracy >= 0.85, accuracy
    report = Path(client.download_artifacts(out["run_id"], "report.json", str(tmp_path))).read_bytes()
    assert report == platform.http.get(f"/v1/jobs/{trained['id']}/artifacts/report.json").content

    # The export is on the job's record.
    recorded = [e for e in platform.events(trained["id"]) if e["type"] == "export.mlflow"]
    assert recorded and recorded[-1]["data"]["run_id"] == out["run_id"]


def test_export_honours_idempotency_keys(platform, trained, mlflow_url):
    """Through the SDK: the same key and body give the same run (replayed, not exported twice)."""
    from mlflow.tracking import MlflowClient

    rf = Refinery(platform.base, api_key=platform.headers["Authorization"].split()[1])
    key = f"mlflow-{trained['id']}"
    first = rf.export_mlflow(trained["id"], mlflow_url, experiment_name="refinery-idempotent", idempotency_key=key)
    again = rf.export_mlflow(trained["id"], mlflow_url, experiment_name="refinery-idempotent", idempotency_key=key)
    assert again == first
    assert len(MlflowClient(tracking_uri=mlflow_url).search_runs([first["experiment_id"]])) == 1
    replayed = platform.http.post(f"/v1/jobs/{trained['id']}/export/mlflow", headers={"Idempotency-Key": key},
                                  json={"tracking_uri": mlflow_url, "experiment_name": "refinery-idempotent"})
    assert replayed.status_code == 201 and replayed.headers.get("idempotent-replayed") == "true"
    with pytest.raises(RefineryError) as reused:
        rf.export_mlflow(trained["id"], mlflow_url, experiment_name="refinery-idempotent", run_name="x",
                         idempotency_key=key)
    assert reused.value.status == 409 and reused.value.code == "idempotency_key_reused"


def test_export_refusals(platform, trained, other_project_headers):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    response = export(platform, trained["id"], tracking_uri=dead)
    seconds = time.monotonic() - started
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "mlflow_export_failed" and dead in error["message"] and error["param"] == "tracking_uri"
    assert seconds < 10, seconds
    print(f"dead tracking server answered 502 in {seconds:.2f} s")
    for uri in ("http://169.254.169.254/", "ftp://127.0.0.1/", "http://user:secret@127.0.0.1:5000"):
        refused = export(platform, trained["id"], tracking_uri=uri)
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "tracking_uri", (uri, refused.text)
    assert export(platform, trained["id"], tracking_uri="http://127.0.0.1:1", bogus=1).status_code == 422
    other = httpx.post(f"{platform.base}/v1/jobs/{trained['id']}/export/mlflow", headers=other_project_headers,
                       json={"tracking_uri": dead})
    assert other.status_code == 404


def test_loopback_needs_the_operators_allowance():
    with pytest.raises(APIError) as refused:
        check_tracking_uri("http://127.0.0.1:5000", Settings(outbound_allowed_networks=""))
    assert refused.value.status == 422 and refused.value.param == "tracking_uri"
    assert "REFINERY_OUTBOUND_ALLOWED_NETWORKS" in refused.value.message
    with pytest.raises(APIError):
        check_tracking_uri("http://localhost:5000", Settings(outbound_allowed_networks="10.0.0.0/8"))
    check_tracking_uri("http://127.0.0.1:5000", Settings(outbound_allowed_networks="127.0.0.0/8"))


def test_params_and_final_metrics_fit_mlflow():
    params = flatten_params({"method": "unlearn", "params": {"lr": 0.1, "augment": True}, "metadata": {"a b/c": "x"},
                             "forget": {"indices": list(range(5000))}, "model": {}})
    assert params["params.lr"] == "0.1" and params["params.augment"] == "true" and params["metadata.a b_c"] == "x"
    assert len(params["forget.indices"]) == MAX_PARAM_VALUE and params["forget.indices"].endswith("characters]")
    assert not any(key.startswith("model") for key in params)
    final = final_metrics({"accuracy": 0.9, "val_loss": 0.2, "per_class_recall": {"0": 1.0}, "note": "x",
                           "ok": True}, taken={"val_loss"})
    assert final == {"accuracy": 0.9, "final.val_loss": 0.2, "per_class_recall.0": 1.0}


def test_running_job_409_throughput_metric_and_followed_logs(platform, data_root, trained):
    job = platform.submit({"method": "train", "model": {"arch": "mlp"}, "params": {"epochs": 1000},
                           "dataset": {"uri": f"file://{data_root}/digits_train.npz"}, "budget": {"max_seconds": 90}})
    key = platform.headers["Authorization"].split()[1]
    follow = subprocess.Popen([str(Path(sys.executable).parent / "refinery"), "--base-url", platform.base,
                               "--api-key", key, "logs", job["id"], "--follow"], env=platform.env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        platform.wait(job["id"], timeout=120, until=("running",))
        busy = export(platform, job["id"], tracking_uri="http://127.0.0.1:1")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "job_not_finished"
        pattern = re.compile(rf'^refinery_job_samples_per_second{{job_id="{job["id"]}",method="train"}} (\S+)$', re.M)
        deadline, rate = time.time() + 60, None
        while time.time() < deadline and not rate:
            found = pattern.search(httpx.get(f"{platform.base}/metrics").text)
            rate = float(found.group(1)) if found else None
            time.sleep(0.5)
        assert rate and rate > 0, "no samples_per_second for the running job"
        print(f"running MLP on digits: {rate:.0f} samples/s")
        assert platform.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        stdout, stderr = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert platform.wait(job["id"])["status"] == "cancelled"
    assert follow.returncode == 1, stdout + stderr  # like `wait`: the job did not succeed
    lines = stdout.splitlines()
    for type_ in ("job.created", "job.started", "data.loaded", "job.cancelled"):
        assert any(f" {type_} " in line for line in lines), (type_, stdout)
    assert "Loaded " in stdout and lines[-1].strip() == "job cancelled"


def test_dispatch_latency_counts_each_attempt_from_its_own_queueing():
    """Attempt 1 waits from job.created to its claim; a requeued attempt from job.requeued (the reaper's) to its
    own claim, not from the job's creation. Real lifecycle calls on a fresh database; the worker's job.started event
    is written as workers/tasks.py writes it."""
    from core.ids import new_id
    from db import lifecycle
    from db.models import Job
    from db.repositories.events import add_event
    from db.repositories.jobs import dispatch_waits, insert_job
    from db.repositories.projects import get_or_create_project
    from db.session import transaction
    from tests.conftest import fresh_database

    def claim_and_start(url, job_id):
        with transaction(url) as session:
            assert lifecycle.claim(session, job_id, "worker-a", lease_seconds=0.1)
            attempt = session.get(Job, job_id).attempt
            add_event(session, job_id, attempt, "job.started", f"Attempt {attempt} started.")

    with fresh_database() as url:
        created = time.time()
        with transaction(url) as session:
            project = get_or_create_project(session, "dispatch")
            jobs = [Job(id=new_id("job"), project_id=project.id, status="queued", method=method, algorithm="a",
                        spec={}, metadata_={}, created_at=time.time(), attempt=1, max_attempts=3, max_seconds=60,
                        used_seconds=0.0, cancel_requested=False, progress={}) for method in ("train", "prune")]
            for job in jobs:
                insert_job(session, job)
                add_event(session, job.id, 1, "job.created", "Job created.")
        time.sleep(0.3)
        claim_and_start(url, jobs[0].id)  # attempt 1: ~0.3 s after creation; the prune job stays queued
        first_claimed = time.time()
        time.sleep(0.2)
        with transaction(url) as session:
            assert lifecycle.reap_expired(session) == [(jobs[0].id, "queued")]
        time.sleep(0.8)
        claim_and_start(url, jobs[0].id)  # attempt 2: ~0.8 s after its requeue, ~1.3 s after creation
        second_claimed = time.time()
        with transaction(url, readonly=True) as session:
            waits = sorted(wait for _, wait in dispatch_waits(session, since=time.time() - 60))
            assert {method for method, _ in dispatch_waits(session, since=time.time() - 60)} == {"train"}
    first, second = waits
    assert 0.3 <= first <= first_claimed - created, waits
    # From the requeue, which came at least 0.5 s after creation (0.3 s queued, then 0.2 s for the lease to expire).
    assert 0.8 <= second <= second_claimed - created - 0.5, waits


def exposed_metric_names(text: str) -> set[str]:
    """Every series name a scrape of /metrics offers, families without samples (# TYPE only) included."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set())
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def test_metrics_and_the_grafana_dashboard_that_reads_them(platform, trained):
    started = time.monotonic()
    text = httpx.get(f"{platform.base}/metrics").text
    print(f"/metrics scrape: {1000 * (time.monotonic() - started):.0f} ms")
    exposed = exposed_metric_names(text)
    finished = re.search(r'^refinery_jobs_finished_total{method="train",status="succeeded"} (\S+)$', text, re.M)
    assert finished and float(finished.group(1)) >= 1
    assert re.search(r'^refinery_jobs_by_method{method="train",status="succeeded"} \d', text, re.M)
    waits = re.search(r'^refinery_job_dispatch_latency_seconds_count{method="train"} (\S+)$', text, re.M)
    assert waits and float(waits.group(1)) >= 1
    assert re.search(r'^refinery_webhook_deliveries{outcome="pending"} ', text, re.M)
    assert 'refinery_jobs{status="succeeded"}' in text  # the by-status gauge stays as it was

    dashboard = json.loads((CHART / "dashboards" / "refinery.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\brefinery_[a-z_]+\b", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= exposed, (panel["title"], names - exposed)
            queried |= names
    assert {"refinery_job_samples_per_second", "refinery_job_dispatch_latency_seconds_bucket",
            "refinery_webhook_deliveries", "refinery_jobs_finished_total", "refinery_job_duration_seconds_bucket",
            "refinery_queue_depth"} <= queried


def test_chart_ships_the_dashboard_for_grafanas_sidecar():
    """The ConfigMap renders (flag on) with the sidecar's label and the dashboard JSON as it is in the chart; off by
    default. Rendered by tests/test_deploy_manifests.py's Go-template interpreter, taught `.Files.Get`."""
    import yaml

    from tests import test_deploy_manifests as charts

    class WithFiles(charts.GoTemplate):
        def _command(self, command, dot, scopes, piped):
            kind, head = command[0]
            if kind in ("field", "var") and head.endswith(".Files.Get") and len(command) == 2:
                return (CHART / self._operand(command[1], dot, scopes)).read_text()
            return super()._command(command, dot, scopes, piped)

    assert "grafana-dashboard.yaml" in charts.render_chart(charts.BASE)
    assert not charts.render_chart(charts.BASE)["grafana-dashboard.yaml"].strip()
    values = charts.deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), charts.deep_merge(
        charts.BASE, {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Refinery"}}}))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    name = "refinery/templates/grafana-dashboard.yaml"
    top = {"Values": charts.go_values(values), "Chart": {k[0].upper() + k[1:]: v for k, v in chart.items()},
           "Release": {"Name": "prod", "Namespace": "refinery", "Service": "Helm"},
           "Template": {"Name": name, "BasePath": "refinery/templates"}}
    config_map = yaml.safe_load(WithFiles(CHART, "refinery").render(name, top))
    assert config_map["kind"] == "ConfigMap" and config_map["metadata"]["name"] == "prod-refinery-grafana-dashboard"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["app.kubernetes.io/instance"] == "prod"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Refinery"}
    assert json.loads(config_map["data"]["refinery.json"]) == json.loads(
        (CHART / "dashboards" / "refinery.json").read_text())


def test_cli_and_sdk_export_open_and_logs(platform, trained, mlflow_url):
    key = platform.headers["Authorization"].split()[1]
    base = ["--base-url", platform.base, "--api-key", key]
    out = platform.cli(*base, "export", "mlflow", trained["id"], "--tracking-uri", mlflow_url,
                       "--experiment", "refinery-cli")
    assert out.returncode == 0, out.stdout + out.stderr
    exported = json.loads(out.stdout)
    assert exported["object"] == "mlflow_export" and exported["run_id"]
    opened = platform.cli(*base, "open", trained["id"])
    assert opened.returncode == 0 and opened.stdout.strip() == f"{platform.base}/ui/jobs/{trained['id']}"
    public = platform.cli(*base, "open", trained["id"], "--public-url", "https://refinery.example.com/")
    assert public.stdout.strip() == f"https://refinery.example.com/ui/jobs/{trained['id']}"
    assert platform.cli(*base, "open", "job_doesnotexist").returncode == 2
    logs = platform.cli(*base, "logs", trained["id"])
    assert logs.returncode == 0, logs.stderr
    types = [line.split()[2] for line in logs.stdout.splitlines()]
    assert types[0] == "job.created" and "job.succeeded" in types and "export.mlflow" in types
    assert any(f"Epoch {EPOCHS}/{EPOCHS}" in line for line in logs.stdout.splitlines())  # messages whole, unwrapped

    rf = Refinery(platform.base, api_key=key)
    assert rf.dashboard_url(trained["id"]) == f"{platform.base}/ui/jobs/{trained['id']}"
