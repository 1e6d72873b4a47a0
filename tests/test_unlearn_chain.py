"""Deletion requests as a stream, over HTTP on Postgres, Redis and a real Celery worker: each unlearn job starts from
the model the previous one produced, the forget sets accumulate (named by indices, by a file of rows, by class),
the last request's retrain is the retrain on the cumulative retain set, dmm reuses the first model's datamodel, and
every job's deletion certificate is checked by the test's own HMAC and hashes and by `refinery verify-certificate`."""
import hashlib
import hmac
import io
import json

import numpy as np
import pytest
import safetensors.numpy

SEED = 0
BUDGET = {"max_seconds": 300}
TRAIN = {"epochs": 20}  # a short recipe: every retrain and oracle repeats it


@pytest.fixture(scope="module")
def digits(data_root):
    train, test = np.load(data_root / "digits_train.npz"), np.load(data_root / "digits_test.npz")
    return {"x": train["x"], "y": train["y"], "test_x": test["x"], "test_y": test["y"],
            "file": data_root / "digits_train.npz",
            "dataset": {"uri": f"file://{data_root}/digits_train.npz",
                        "validation": {"uri": f"file://{data_root}/digits_test.npz"}}}


@pytest.fixture(scope="module")
def trained(platform, digits):
    job = platform.submit({"method": "train", "model": {"arch": "mlp", "args": {"hidden": [64]}},
                           "dataset": digits["dataset"], "params": TRAIN, "budget": BUDGET, "seed": SEED})
    job = platform.wait(job["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="module")
def requests(digits):
    """Three disjoint deletion requests of 40 rows each, as rows of the training file."""
    order = np.random.default_rng(7).permutation(len(digits["y"]))
    return [sorted(order[i * 40:(i + 1) * 40].tolist()) for i in range(3)]


def unlearn(platform, digits, model_job, algorithm, forget, params=None, dataset=None, evaluate=None, wait=True):
    spec = {"method": "unlearn", "algorithm": algorithm, "model": {"uri": f"job://{model_job['id']}"},
            "dataset": dataset or digits["dataset"], "forget": forget, "params": params or {}, "budget": BUDGET,
            "seed": SEED}
    if evaluate:
        spec["evaluate"] = evaluate
    job = platform.wait(platform.submit(spec)["id"])
    if wait:
        assert job["status"] == "succeeded", job["error"]
    return job


def artifact(platform, job, name) -> bytes:
    response = platform.http.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
    assert response.status_code == 200, response.text
    return response.content


def report_of(platform, job) -> dict:
    return json.loads(artifact(platform, job, "report.json"))


def forget_sha256(digits, rows) -> str:
    digest = hashlib.sha256()
    for row in sorted(rows):
        digest.update(np.ascontiguousarray(digits["x"][row], dtype=np.float32).tobytes())
        digest.update(int(digits["y"][row]).to_bytes(8, "little"))
    return digest.hexdigest()


@pytest.fixture(scope="module")
def chain(platform, digits, trained, requests):
    """finetune on rows by index → finetune on rows from an uploaded file → retrain on rows by index."""
    body = io.BytesIO()
    np.savez(body, x=digits["x"][requests[1]], y=digits["y"][requests[1]])
    upload = platform.http.post("/v1/files", files={"file": ("week2.npz", body.getvalue())}).json()
    first = unlearn(platform, digits, trained, "finetune", {"indices": requests[0]}, {"epochs": 1})
    second = unlearn(platform, digits, first, "finetune", {"uri": upload["id"]}, {"epochs": 1})
    third = unlearn(platform, digits, second, "retrain", {"indices": requests[2]})
    return [first, second, third]


def test_three_requests_accumulate_and_end_where_a_retrain_does(platform, digits, trained, requests, chain):
    everything = sorted(sum(requests, []))
    for count, job in enumerate(chain, start=1):
        report = report_of(platform, job)
        so_far = sorted(sum(requests[:count], []))
        assert report["forget_set"]["size"] == len(so_far) == 40 * count
        assert report["forget_set"]["sha256"] == forget_sha256(digits, so_far)
        assert report["unlearning"]["retain_rows"] == len(digits["y"]) - 40 * count
        ledger = report["chain"]
        assert ledger["jobs"] == [j["id"] for j in chain[:count]]
        assert [r["size"] for r in ledger["requests"]] == [40] * count
        assert [r["sha256"] for r in ledger["requests"]] == [forget_sha256(digits, rows) for rows in requests[:count]]
        assert [r["named_by"] for r in ledger["requests"]] == ["indices", "uri", "indices"][:count]
        assert ledger["first_model"] == f"job://{trained['id']}"
        assert job["result"]["metrics"]["forget_set_size"] == 40 * count
    # The chain's last request retrains on the cumulative retain set: a single retrain of the union from the
    # original model, same recipe and seed, is the same model.
    direct = unlearn(platform, digits, trained, "retrain", {"indices": everything})
    chained, alone = report_of(platform, chain[-1]), report_of(platform, direct)
    assert chained["forget_set"]["sha256"] == alone["forget_set"]["sha256"]
    unlearned = {row["name"]: row for row in chained["comparison"]}["unlearned (retrain)"]
    retrained = {row["name"]: row for row in alone["comparison"]}["unlearned (retrain)"]
    for key in ("forget_accuracy", "retain_accuracy", "test_accuracy"):
        assert unlearned[key] == retrained[key], key
    # Same rows, recipe and seed on the same worker: the very same weights.
    chained_weights = safetensors.numpy.load(artifact(platform, chain[-1], "model.safetensors"))
    direct_weights = safetensors.numpy.load(artifact(platform, direct, "model.safetensors"))
    assert chained_weights.keys() == direct_weights.keys()
    for name, tensor in chained_weights.items():
        np.testing.assert_array_equal(tensor, direct_weights[name], err_msg=name)
    names = [row["name"] for row in chained["comparison"]]
    assert names[:2] == ["original model (before the chain's first request)", "input model (after request 2 of the chain)"]


def test_certificate_signature_and_hashes_recomputed(platform, digits, trained, requests, chain, tmp_path):
    job = chain[-1]
    document = json.loads(artifact(platform, job, "certificate.json"))
    body, signature = document["certificate"], document["signature"]
    key = (platform.home / "certificate_key").read_bytes().strip()  # made by the worker on first use: no env key
    assert (platform.home / "certificate_key").stat().st_mode & 0o777 == 0o600
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert signature["algorithm"] == "HMAC-SHA256"
    assert hmac.compare_digest(signature["value"], hmac.new(key, canonical, hashlib.sha256).hexdigest())
    for name in ("model.safetensors", "model.onnx", "model.json"):
        assert body["result"][name] == hashlib.sha256(artifact(platform, job, name)).hexdigest(), name
    original = artifact(platform, trained, "model.safetensors")
    assert body["original_model"]["model.safetensors_sha256"] == hashlib.sha256(original).hexdigest()
    everything = sorted(sum(requests, []))
    assert body["forget_set"]["size"] == 120 and body["forget_set"]["file_rows"] == everything
    assert body["forget_set"]["sha256"] == forget_sha256(digits, everything)
    training = hashlib.sha256(np.ascontiguousarray(digits["x"], dtype=np.float32).tobytes()
                              + digits["y"].astype("<i8").tobytes()).hexdigest()
    assert body["training_set"]["sha256"] == training
    assert [link["job_id"] for link in body["chain"]] == [j["id"] for j in chain]
    assert body["algorithm"]["name"] == "retrain" and "forget_accuracy" in body["evaluation"]["accuracy"]
    rows = {row["name"]: row for row in report_of(platform, job)["comparison"]}
    before, after = rows["original model (before the chain's first request)"], rows["unlearned (retrain)"]
    for key, certified in body["evaluation"]["accuracy"].items():
        assert certified == {"original": before[key], "unlearned": after[key],
                             "delta": round(after[key] - before[key], 4)}, key
    assert body["evaluation"]["mia_auc"] == {"original": before["mia_auc"], "unlearned": after["mia_auc"]}

    path = tmp_path / "certificate.json"
    path.write_text(json.dumps(document))
    ok = platform.cli("--base-url", platform.base, "--api-key", platform.headers["Authorization"].split()[1],
                      "verify-certificate", str(path), "--job", job["id"], "--dataset", str(digits["file"]))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "certificate valid" in ok.stdout and "forget set" in ok.stdout
    tampered = json.loads(json.dumps(document))
    tampered["certificate"]["forget_set"]["size"] = 119
    path.write_text(json.dumps(tampered))
    bad = platform.cli("--base-url", platform.base, "--api-key", platform.headers["Authorization"].split()[1],
                       "verify-certificate", str(path), "--job", job["id"])
    assert bad.returncode == 1 and "signature mismatch" in bad.stdout, bad.stdout + bad.stderr
    # A model file swapped under an intact certificate: the hash, not the signature, catches it.
    folder = tmp_path / "artifacts"
    folder.mkdir()
    path.write_text(json.dumps(document))
    (folder / "model.onnx").write_bytes(artifact(platform, job, "model.onnx") + b"\0")
    swapped = platform.cli("verify-certificate", str(path), "--artifacts", str(folder))
    assert swapped.returncode == 1 and "model.onnx: sha256" in swapped.stdout, swapped.stdout + swapped.stderr


def test_a_chain_on_another_dataset_is_refused(platform, digits, data_root, chain):
    other = {"uri": f"file://{data_root}/digits_test.npz", "validation": {"uri": f"file://{data_root}/digits_train.npz"}}
    job = unlearn(platform, digits, chain[-1], "finetune", {"indices": [0, 1]}, {"epochs": 1}, dataset=other,
                  wait=False)
    assert job["status"] == "failed" and job["error"]["code"] == "chain_dataset_mismatch", job["error"]
    assert chain[-1]["id"] in job["error"]["message"] and "same training set" in job["error"]["message"]


def test_dmm_chain_reuses_the_first_models_attribution(platform, digits, trained, requests):
    params = {"attribution_models": 30, "epochs": 5}  # 30: every 3rd drops a class, all 10 once
    first = unlearn(platform, digits, trained, "dmm", {"class": 3}, params)
    second = unlearn(platform, digits, first, "dmm", {"indices": requests[0]}, params, evaluate={"oracles": 2})
    fitted, reused = report_of(platform, first), report_of(platform, second)
    assert fitted["attribution"]["reused"] is False and fitted["attribution"]["fitted_by"] == first["id"]
    assert reused["attribution"]["reused"] is True and reused["attribution"]["fitted_by"] == first["id"]
    assert reused["attribution"]["key"] == fitted["attribution"]["key"]
    # lr "auto" is reported with the rate it resolved to: the dense one on this MLP, in the report and certificate.
    assert reused["unlearning"]["params"]["lr"] == "auto" and reused["unlearning"]["params"]["lr_used"] == 2e-3
    certified = json.loads(artifact(platform, second, "certificate.json"))["certificate"]["algorithm"]["params"]
    assert certified["lr"] == "auto" and certified["lr_used"] == 2e-3
    assert reused["attribution"]["one_time_seconds"] is None and "one_time_attribution_seconds" not in reused["cost"]
    names = [a["name"] for a in platform.http.get(f"/v1/jobs/{second['id']}/artifacts").json()["data"]]
    assert not any(name.startswith("attribution-") for name in names) and "certificate.json" in names
    ready = [e for e in platform.events(second["id"]) if e["type"] == "attribution.ready"]
    assert ready and ready[0]["data"]["reused"] is True
    threes = {row for row in range(len(digits["y"])) if digits["y"][row] == 3}
    union = sorted(threes | set(requests[0]))
    assert reused["forget_set"]["size"] == len(union)
    assert reused["forget_set"]["sha256"] == forget_sha256(digits, union)
    unlearned = {row["name"]: row for row in reused["comparison"]}["unlearned (dmm)"]
    assert [r["named_by"] for r in reused["chain"]["requests"]] == ["class", "indices"]
    assert unlearned["test_accuracy_forget_class"] <= 0.2  # class 3 stays gone after the second request ...
    assert unlearned["test_accuracy_other_classes"] >= 0.85  # ... and the rest is kept
    # evaluate.oracles on a chain: the K originals replay both requests, judged on the cumulative retain set.
    assert reused["klom_estimator"]["k"] == 2 and "2 requests" in reused["klom_estimator"]["unlearned"]
    assert {row["rows"] for row in reused["klom"]} == {"forget", "retain", "test", "test_forget_class"}


def test_an_earlier_request_whose_file_changed_is_refused(platform, digits, data_root, trained, requests):
    path = data_root / "forget_week1.npz"
    np.savez(path, x=digits["x"][requests[0]], y=digits["y"][requests[0]])
    first = unlearn(platform, digits, trained, "finetune", {"uri": f"file://{path}"}, {"epochs": 1})
    np.savez(path, x=digits["x"][requests[1]], y=digits["y"][requests[1]])  # the file now names other rows
    job = unlearn(platform, digits, first, "finetune", {"indices": requests[2]}, {"epochs": 1}, wait=False)
    assert job["status"] == "failed" and job["error"]["code"] == "chain_forget_changed", job["error"]
    assert first["id"] in job["error"]["message"]
