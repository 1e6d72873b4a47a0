"""Jobs end to end on the production shape (Postgres, Redis, a real Celery worker): submit over HTTP, poll, read
events and metrics, download artifacts as a user would and score model.onnx in ONNX Runtime; then bad input,
cancels, budgets, a SIGKILLed worker and a lost broker message."""
import hashlib
import io
import json
import time

import httpx
import numpy as np
import pytest

from tests.conftest import QUEUE, onnx_accuracy


@pytest.fixture(scope="module")
def digits_job(platform, data_root):
    job = platform.submit({"method": "train", "dataset": {"uri": f"file://{data_root}/digits_train.npz",
                                                          "validation": {"fraction": 0.1}},
                           "budget": {"max_seconds": 240}, "seed": 0})
    return platform.wait(job["id"])


def test_train_on_npz_scores_in_onnx_runtime(platform, digits_job, data_root):
    assert digits_job["status"] == "succeeded", digits_job["error"]
    result = digits_job["result"]
    assert result["stopped_by"] == "completed"
    names = {a["name"]: a for a in platform.http.get(f"/v1/jobs/{digits_job['id']}/artifacts").json()["data"]}
    assert set(names) == {"model.safetensors", "model.json", "model.onnx", "report.json", "report.html"}
    onnx = platform.http.get(f"/v1/jobs/{digits_job['id']}/artifacts/model.onnx")
    assert onnx.headers["etag"] == f'"{hashlib.sha256(onnx.content).hexdigest()}"'
    assert int(onnx.headers["content-length"]) == len(onnx.content) == names["model.onnx"]["size"]
    test = np.load(data_root / "digits_test.npz")
    accuracy = onnx_accuracy(onnx.content, test["x"], test["y"])
    assert accuracy >= 0.97, accuracy  # held-out rows the job never saw, raw inputs (normalisation is in the graph)


def test_range_requests_and_conditional_get(platform, digits_job):
    url = f"/v1/jobs/{digits_job['id']}/artifacts/model.onnx"
    full = platform.http.get(url)
    head = platform.http.get(url, headers={"Range": "bytes=0-99"})
    tail = platform.http.get(url, headers={"Range": "bytes=100-"})
    suffix = platform.http.get(url, headers={"Range": "bytes=-10"})
    assert head.status_code == tail.status_code == suffix.status_code == 206
    assert head.content + tail.content == full.content and suffix.content == full.content[-10:]
    assert head.headers["content-range"] == f"bytes 0-99/{len(full.content)}"
    assert platform.http.get(url, headers={"Range": f"bytes={len(full.content)}-"}).status_code == 416
    assert platform.http.get(url, headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    assert platform.http.get(f"/v1/jobs/{digits_job['id']}/artifacts/nope.bin").status_code == 404


def test_report_card_events_and_metrics(platform, digits_job):
    jid = digits_job["id"]
    report = platform.http.get(f"/v1/jobs/{jid}/artifacts/report.json").json()
    for key in ("accuracy", "params", "flops"):
        assert report["summary"][key] > 0
    assert set(report["per_class"]["recall"]) == {str(i) for i in range(10)}
    assert report["model"]["size_bytes"]["onnx"] > 0 and report["model"]["latency_ms"]["onnxruntime_b1"] > 0
    assert report["budget"]["used_seconds"] <= report["budget"]["max_seconds"]
    card = platform.http.get(f"/v1/jobs/{jid}/artifacts/model.json").json()
    assert card["arch"] == "cnn" and card["input_shape"] == [1, 8, 8] and card["num_classes"] == 10
    html = platform.http.get(f"/v1/jobs/{jid}/artifacts/report.html")
    assert html.headers["content-type"].startswith("text/html") and b"<svg" in html.content
    types = [e["type"] for e in platform.events(jid)]
    for phase in ("job.created", "job.started", "data.loaded", "model.built", "train.epoch", "train.finished",
                  "artifacts.written", "job.succeeded"):
        assert phase in types, phase
    metrics = platform.http.get(f"/v1/jobs/{jid}/metrics").json()["data"]
    series = {m["name"]: m["points"] for m in metrics}
    assert {"train_loss", "val_loss", "val_accuracy", "lr"} <= set(series)
    assert [p["step"] for p in series["val_accuracy"]] == list(range(1, 31))
    assert series["train_loss"][-1]["value"] < series["train_loss"][0]["value"]
    only = platform.http.get(f"/v1/jobs/{jid}/metrics", params={"name": "val_accuracy"}).json()["data"]
    assert [m["name"] for m in only] == ["val_accuracy"]


def test_events_stream_live_over_sse(platform):
    job = platform.submit({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 3},
                           "budget": {"max_seconds": 120}})
    seen = []
    with httpx.stream("GET", f"{platform.base}/v1/jobs/{job['id']}/events", timeout=120,
                      headers={**platform.headers, "Accept": "text/event-stream"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                seen.append(line[7:])
            if line == "event: end":
                break
    assert seen[0] == "job.created" and "job.succeeded" in seen and seen[-1] == "end"
    assert seen.count("train.epoch") == 3


def test_train_on_csv_with_label_column(platform, data_root):
    job = platform.submit({"method": "train", "dataset": {"uri": f"file://{data_root}/wine_train.csv",
                                                          "label_column": "cultivar", "validation": {"fraction": 0.1}},
                           "budget": {"max_seconds": 120}})
    job = platform.wait(job["id"])
    assert job["status"] == "succeeded", job["error"]
    card = platform.http.get(f"/v1/jobs/{job['id']}/artifacts/model.json").json()
    assert card["arch"] == "mlp" and card["input_shape"] == [13]
    test = np.load(data_root / "wine_test.npz")
    onnx = platform.http.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content
    assert onnx_accuracy(onnx, test["x"], test["y"]) >= 0.9  # raw, unscaled features


def test_uploaded_dataset_and_fine_tuning_from_a_job(platform, data_root, digits_job):
    upload = platform.http.post("/v1/files", files={"file": ("digits.npz", (data_root / "digits_train.npz").read_bytes())})
    assert upload.status_code == 201
    job = platform.submit({"method": "train", "model": {"uri": f"job://{digits_job['id']}"},
                           "dataset": {"uri": upload.json()["id"], "validation": {"uri": f"file://{data_root}/digits_test.npz"}},
                           "params": {"epochs": 2, "lr": 1e-4}, "budget": {"max_seconds": 120}})
    job = platform.wait(job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["metrics"]["accuracy"] >= 0.97  # starts from the trained model, so two epochs are enough
    report = platform.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["model"]["source"] == f"job://{digits_job['id']}"


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_bad_inputs_fail_with_codes_and_the_worker_carries_on(platform, data_root, digits_job):
    rng = np.random.default_rng(0)
    x = rng.random((60, 1, 8, 8), dtype=np.float32)
    nan_x = x.copy()
    nan_x[3, 0, 0, 0] = np.nan
    bad_files = {
        "nan.npz": _npz(x=nan_x, y=rng.integers(0, 3, 60)),
        "rank5.npz": _npz(x=rng.random((60, 1, 2, 8, 8)), y=rng.integers(0, 3, 60)),
        "negative.npz": _npz(x=x, y=-rng.integers(1, 3, 60)),
        "short.npz": _npz(x=x, y=rng.integers(0, 3, 50)),
        "garbage.npz": b"this is not a zip archive",
        "val.npz": _npz(x=x[:20], y=np.full(20, 7)),
    }
    ids = {name: platform.http.post("/v1/files", files={"file": (name, body)}).json()["id"]
           for name, body in bad_files.items()}
    wrong_weights = platform.http.post("/v1/files", files={"file": ("w.safetensors", _safetensors_of_wrong_shape())})
    pickle_weights = platform.http.post("/v1/files", files={"file": ("w.pt", _pickle_payload(data_root))})
    cases = {
        "dataset_not_found": {"uri": f"file://{data_root}/missing.npz"},
        "uri_forbidden": {"uri": "file:///etc/passwd.csv", "label_column": "x"},
        "dataset_unreadable": {"uri": ids["garbage.npz"]},
        "file_not_found": {"uri": "file_doesnotexist"},
    }
    for code in ("dataset_invalid",):
        cases[code] = {"uri": ids["nan.npz"]}
    cases["dataset_invalid/rank"] = {"uri": ids["rank5.npz"]}
    cases["dataset_invalid/length"] = {"uri": ids["short.npz"]}
    cases["labels_invalid"] = {"uri": ids["negative.npz"]}
    cases["labels_out_of_range"] = {"uri": f"file://{data_root}/digits_train.npz"[:0] + ids["nan.npz"].replace(
        ids["nan.npz"], f"file://{data_root}/wine_test.npz"), "validation": {"uri": ids["val.npz"]}}
    jobs = {code: platform.submit({"method": "train", "dataset": dataset, "budget": {"max_seconds": 60}})["id"]
            for code, dataset in cases.items()}
    jobs["weights_mismatch"] = platform.submit({
        "method": "train", "model": {"uri": wrong_weights.json()["id"], "arch": "cnn"},
        "dataset": {"uri": "builtin://digits"}, "budget": {"max_seconds": 60}})["id"]
    jobs["unsafe_format"] = platform.submit({
        "method": "train", "model": {"uri": pickle_weights.json()["id"], "arch": "cnn"},
        "dataset": {"uri": "builtin://digits"}, "budget": {"max_seconds": 60}})["id"]
    jobs["model_data_mismatch"] = platform.submit({
        "method": "train", "model": {"uri": f"job://{digits_job['id']}"},
        "dataset": {"uri": "builtin://wine"}, "budget": {"max_seconds": 60}})["id"]
    jobs["invalid_model_args"] = platform.submit({
        "method": "train", "model": {"arch": "cnn", "args": {"channels": "wide"}},
        "dataset": {"uri": "builtin://digits"}, "budget": {"max_seconds": 60}})["id"]
    worker_pid = platform.worker_proc.pid
    for label, jid in jobs.items():
        job = platform.wait(jid, timeout=120)
        assert job["status"] == "failed", (label, job)
        assert job["error"]["code"] == label.split("/")[0], (label, job["error"])
        assert job["error"]["class"] == "user_error" and len(job["error"]["message"]) > 15
    assert not (data_root / "pwned").exists()
    ok = platform.wait(platform.submit({"method": "train", "dataset": {"uri": "builtin://digits"},
                                        "params": {"epochs": 1}, "budget": {"max_seconds": 60}})["id"])
    assert ok["status"] == "succeeded" and platform.worker_proc.pid == worker_pid
    assert platform.worker_proc.poll() is None


def _safetensors_of_wrong_shape() -> bytes:
    from safetensors.numpy import save
    return save({"body.features.0.weight": np.zeros((3, 3), dtype=np.float32)})


def _pickle_payload(data_root) -> bytes:
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {data_root}/pwned",))
    return pickle.dumps(Payload())


def test_cancel_queued_and_running_jobs(platform):
    long = {"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 500},
            "budget": {"max_seconds": 300}}
    running = platform.submit(long)
    queued = platform.submit(long)  # one solo worker: this one waits behind the first
    platform.wait(running["id"], until=("running",))
    cancelled = platform.http.post(f"/v1/jobs/{queued['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    deadline = time.time() + 60
    while time.time() < deadline and platform.job(running["id"])["progress"].get("epoch") in (None, 0):
        time.sleep(0.2)
    assert platform.http.post(f"/v1/jobs/{running['id']}/cancel").json()["cancel_requested"] is True
    stopped = platform.wait(running["id"], timeout=60)
    assert stopped["status"] == "cancelled" and stopped["result"]["stopped_by"] == "cancelled"
    assert stopped["progress"]["epoch"] < 500
    again = platform.job(queued["id"])
    assert again["status"] == "cancelled" and again["started_at"] is None
    assert "job.started" not in [e["type"] for e in platform.events(queued["id"])]


def test_budget_stops_cleanly_and_keeps_the_best_model(platform):
    job = platform.submit({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": "auto",
                           "patience": 1000}, "budget": {"max_seconds": 8}})
    job = platform.wait(job["id"], timeout=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["stopped_by"] == "budget"
    assert job["budget"]["used_seconds"] <= 8 + 2  # export after the stop is counted too
    assert job["result"]["metrics"]["accuracy"] > 0.9
    assert "budget.exhausted" in [e["type"] for e in platform.events(job["id"])]
    steps = platform.submit({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 50},
                             "budget": {"max_seconds": 120, "max_steps": 30}})
    steps = platform.wait(steps["id"])
    assert steps["status"] == "succeeded" and steps["result"]["stopped_by"] == "budget"
    report = platform.http.get(f"/v1/jobs/{steps['id']}/artifacts/report.json").json()
    assert report["training"]["steps"] == 30


def test_a_budget_too_small_for_one_epoch_fails_with_budget_exhausted(platform):
    job = platform.submit({"method": "train", "dataset": {"uri": "builtin://mnist5k"}, "model": {"arch": "resnet56"},
                           "budget": {"max_seconds": 2}})
    job = platform.wait(job["id"], timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "budget_exhausted", job


def test_sigkilled_worker_job_resumes_on_a_new_attempt(platform):
    job = platform.submit({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 60},
                           "budget": {"max_seconds": 300}, "seed": 3})
    deadline = time.time() + 120
    while time.time() < deadline and "checkpoint.saved" not in [e["type"] for e in platform.events(job["id"])]:
        time.sleep(0.2)
    killed_at = time.time()
    platform.kill_worker()
    platform.start_worker()
    done = platform.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    events = platform.events(job["id"])
    resumed = [e for e in events if e["type"] == "job.resumed"]
    assert resumed and resumed[0]["data"]["step"] > 0 and resumed[0]["attempt"] == 2
    assert "job.requeued" in [e["type"] for e in events]
    epochs = [p["step"] for p in next(m for m in platform.http.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
                                      if m["name"] == "val_accuracy")["points"]]
    assert epochs == list(range(1, 61))  # replayed epochs replaced, not duplicated
    print(f"recovered in {done['finished_at'] - killed_at:.1f}s")


def test_a_lost_broker_message_does_not_lose_the_job(platform, redis_client):
    platform.kill_worker()
    job = platform.submit({"method": "train", "dataset": {"uri": "builtin://digits"}, "params": {"epochs": 1},
                           "budget": {"max_seconds": 60}})
    time.sleep(0.5)
    assert redis_client.llen(QUEUE) >= 1
    redis_client.delete(QUEUE)  # the broker forgets the message (a Redis restart without persistence)
    platform.start_worker()
    done = platform.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempt"] == 1


def test_report_html_is_self_contained(platform, digits_job):
    html = platform.http.get(f"/v1/jobs/{digits_job['id']}/artifacts/report.html").text
    import re
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched from elsewhere
    assert json.loads(platform.http.get(f"/v1/jobs/{digits_job['id']}/artifacts/report.json").text)


def test_a_job_delivered_several_times_runs_once(platform):
    from core.broker import publish

    job = platform.submit({"method": "train", "dataset": {"uri": "builtin://iris"}, "params": {"epochs": 3},
                           "budget": {"max_seconds": 60}})
    for _ in range(3):  # duplicates from a redelivery or an over-eager dispatcher
        publish(job["id"], QUEUE)
    done = platform.wait(job["id"])
    publish(job["id"], QUEUE)  # and one after it finished
    time.sleep(2)
    types = [e["type"] for e in platform.events(job["id"])]
    assert done["status"] == "succeeded" and done["attempt"] == 1
    assert types.count("job.started") == 1 and types.count("job.succeeded") == 1
    assert platform.job(job["id"])["finished_at"] == done["finished_at"]
