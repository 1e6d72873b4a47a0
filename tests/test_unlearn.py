"""The unlearning family end to end on Postgres, Redis and a real Celery worker: train an MLP on digits over HTTP,
then ask each algorithm to forget a random 10% of its rows or a whole class, and read the results back as a user
would — report.json, the attribution artifact, model.onnx scored in ONNX Runtime against held-out digits. Plus the
spec rules (422), bad forget requests (job errors) and SCRUB's teacher staying frozen (in process)."""
import copy
import hashlib
import io
import time

import numpy as np
import pytest
import torch

from tests.conftest import onnx_accuracy

SEED = 0
K = 32  # evaluation oracles: the targets are set at K=32; bench/unlearn_klom.py has K=100 too
BUDGET = {"max_seconds": 300}
EVALUATED_BUDGET = {"max_seconds": 900}  # 192 subset models, 32 originals and 64 oracles on two cores


@pytest.fixture(scope="module")
def digits(data_root):
    train, test = np.load(data_root / "digits_train.npz"), np.load(data_root / "digits_test.npz")
    return {"train_x": train["x"], "train_y": train["y"], "test_x": test["x"], "test_y": test["y"],
            "dataset": {"uri": f"file://{data_root}/digits_train.npz",
                        "validation": {"uri": f"file://{data_root}/digits_test.npz"}}}


@pytest.fixture(scope="module")
def trained(platform, digits):
    """The model every request unlearns from: MLP 64-128-10 on digits, the issue's reference setting."""
    job = platform.submit({"method": "train", "model": {"arch": "mlp", "args": {"hidden": [128]}},
                           "dataset": digits["dataset"], "budget": BUDGET, "seed": SEED})
    job = platform.wait(job["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="module")
def forget_rows(digits):
    """A random 10% of the training file's rows."""
    n = len(digits["train_y"])
    return sorted(np.random.default_rng(1).choice(n, n // 10, replace=False).tolist())


def unlearn(platform, trained, digits, algorithm, forget, params=None, evaluate=None, timeout=240):
    spec = {"method": "unlearn", "algorithm": algorithm, "model": {"uri": f"job://{trained['id']}"},
            "dataset": digits["dataset"], "forget": forget, "params": params or {}, "budget": BUDGET, "seed": SEED}
    if evaluate:
        spec.update(evaluate=evaluate, budget=EVALUATED_BUDGET)
        timeout = max(timeout, 900)
    job = platform.wait(platform.submit(spec)["id"], timeout=timeout)
    assert job["status"] == "succeeded", job["error"]
    return job


def report_of(platform, job):
    return platform.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()


def onnx_of(platform, job) -> bytes:
    return platform.http.get(f"/v1/jobs/{job['id']}/artifacts/model.onnx").content


def forget_sha256(digits, rows) -> str:
    """The audit hash as the report documents it: rows in file order, float32 inputs then int64 label."""
    digest = hashlib.sha256()
    for row in sorted(rows):
        digest.update(np.ascontiguousarray(digits["train_x"][row], dtype=np.float32).tobytes())
        digest.update(int(digits["train_y"][row]).to_bytes(8, "little"))
    return digest.hexdigest()


def scores(report) -> dict:
    return {row["name"]: row for row in report["comparison"]}


@pytest.fixture(scope="module")
def retrain_job(platform, trained, digits, forget_rows):
    return unlearn(platform, trained, digits, "retrain", {"indices": forget_rows})


@pytest.fixture(scope="module")
def dmm_job(platform, trained, digits, forget_rows):
    return unlearn(platform, trained, digits, "dmm", {"indices": forget_rows}, evaluate={"oracles": K})


def assert_klom_targets(report, groups=("forget", "retain", "test"), retain_margin=0.5, test_margin=0.5):
    """The issue's targets at K=32: KLoM95 within floor + 1.0 on the forget rows and floor + 0.5 on retain and
    test rows, every group well below doing nothing."""
    klom = {row["rows"]: row for row in report["klom"]}
    assert report["klom_estimator"]["k"] == K and set(klom) == set(groups)
    assert klom["forget"]["unlearned"] <= klom["forget"]["floor"] + 1.0, klom
    for name, margin in (("retain", retain_margin), ("test", test_margin)):
        assert klom[name]["unlearned"] <= klom[name]["floor"] + margin, klom
    for row in klom.values():
        assert row["floor"] > 0 and row["unlearned"] <= row["original"] - 2.0, row


# --- the catalog and spec rules -----------------------------------------------------------------------------------


def test_catalog_publishes_every_unlearning_algorithm(platform):
    methods = {m["name"]: m for m in platform.http.get("/v1/methods").json()["data"]}
    unlearn_entry = methods["unlearn"]
    algorithms = {a["name"]: a for a in unlearn_entry["algorithms"]}
    assert set(algorithms) == {"retrain", "finetune", "neggrad_plus", "scrub", "dmm", "oracle_matching"}
    assert unlearn_entry["default_algorithm"] == "dmm"
    scrub = algorithms["scrub"]["params_schema"]["properties"]
    assert scrub["temperature"]["default"] == 4.0 and scrub["alpha"]["minimum"] == 0


GOOD = {"method": "unlearn", "model": {"uri": "job://job_x"}, "dataset": {"uri": "builtin://digits"},
        "forget": {"class": 3}}


@pytest.mark.parametrize("change,param", [
    ({"forget": None}, "forget"),
    ({"forget": {"class": 3, "indices": [1]}}, "forget"),
    ({"forget": {}}, "forget"),
    ({"forget": {"indices": []}}, "forget.indices"),
    ({"forget": {"indices": [4, -2]}}, "forget.indices"),
    ({"forget": {"uri": "ftp://x/y.npz"}}, "forget.uri"),
    ({"model": None}, "model.uri"),
    ({"model": {"arch": "mlp"}}, "model.uri"),
    ({"evaluate": {"oracles": 1}}, "evaluate.oracles"),
    ({"evaluate": {"oracles": 10_000}}, "evaluate.oracles"),
    ({"evaluate": {"oracles": "many"}}, "evaluate.oracles"),
    ({"evaluate": {"klom": True}}, "evaluate.klom"),
    ({"algorithm": "scrub", "params": {"temperature": 0}}, "params.temperature"),
    ({"algorithm": "neggrad_plus", "params": {"alpha": 1.5}}, "params.alpha"),
    ({"algorithm": "dmm", "params": {"attribution_models": 2}}, "params.attribution_models"),
    ({"algorithm": "finetune", "params": {"epochs": 5, "momentum": 0.9}}, "params.momentum"),
])
def test_bad_unlearn_specs_are_422_naming_the_field(platform, change, param):
    spec = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    r = platform.http.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param, r.json()


# --- algorithms end to end ----------------------------------------------------------------------------------------


def test_retrain_is_the_reference(platform, trained, digits, forget_rows, retrain_job):
    report = report_of(platform, retrain_job)
    audit = report["forget_set"]
    assert audit["size"] == len(forget_rows) and audit["named_by"] == "indices"
    assert audit["sha256"] == forget_sha256(digits, forget_rows)
    assert report["unlearning"]["retain_rows"] == len(digits["train_y"]) - len(forget_rows)
    assert report["unlearning"]["epochs_run"] == 30  # the original train job's recipe
    assert report["origin"]["train_job"] == trained["id"]
    assert report["cost"]["ratio"] == 1.0
    unlearned = scores(report)["unlearned (retrain)"]
    assert unlearned["test_accuracy"] >= 0.95 and unlearned["retain_accuracy"] >= 0.98
    # A retrain never saw the forget set: the loss-threshold attack is near chance on it.
    assert abs(unlearned["mia_auc"] - 0.5) < 0.1
    accuracy = onnx_accuracy(onnx_of(platform, retrain_job), digits["test_x"], digits["test_y"])
    assert abs(accuracy - unlearned["test_accuracy"]) < 1e-6


def test_dmm_fits_the_attribution_once_and_evaluates_against_oracles(platform, digits, forget_rows, dmm_job,
                                                                     retrain_job):
    report = report_of(platform, dmm_job)
    attribution = report["attribution"]
    assert attribution["reused"] is False and attribution["fitted_by"] == dmm_job["id"]
    names = [a["name"] for a in platform.http.get(f"/v1/jobs/{dmm_job['id']}/artifacts").json()["data"]]
    assert attribution["artifact"] in names
    assert report["forget_set"]["sha256"] == forget_sha256(digits, forget_rows)
    # Accuracies within a point of the retrain's, read from the deployable model.
    retrain = scores(report_of(platform, retrain_job))["unlearned (retrain)"]
    unlearned = scores(report)["unlearned (dmm)"]
    for key in ("forget_accuracy", "retain_accuracy", "test_accuracy"):
        assert abs(unlearned[key] - retrain[key]) <= 0.01 + 1e-9, (key, unlearned, retrain)
    accuracy = onnx_accuracy(onnx_of(platform, dmm_job), digits["test_x"], digits["test_y"])
    assert abs(accuracy - retrain["test_accuracy"]) <= 0.01 + 1e-9
    assert_klom_targets(report)
    assert report["cost"]["ratio"] > 0 and report["cost"]["one_time_attribution_seconds"] > 0
    assert dmm_job["result"]["metrics"]["forget_set_sha256"] == report["forget_set"]["sha256"]


def test_dmm_reuses_the_attribution_and_forgets_a_class(platform, trained, digits, dmm_job):
    """A whole class at the oracle floor: a retrained model puts the class's rows on the classes they look like,
    row by row, and dmm's class model predicts that. KLoM95 within the issue's floor + 1.0 on the forget rows and
    floor + 0.5 on retain and test (bench: 3.74 / 3.04 / 3.23 against 3.28 / 2.97 / 2.86); before the class model
    it was 11.2 / 8.7 / 10.0."""
    job = unlearn(platform, trained, digits, "dmm", {"class": 3}, evaluate={"oracles": K})
    report = report_of(platform, job)
    assert_klom_targets(report, ("forget", "retain", "test", "test_forget_class"))
    assert report["attribution"]["reused"] is True and report["attribution"]["fitted_by"] == dmm_job["id"]
    names = [a["name"] for a in platform.http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]]
    assert not any(name.startswith("attribution-") for name in names)
    assert report["forget_set"]["size"] == int((digits["train_y"] == 3).sum())
    x, y = digits["test_x"], digits["test_y"]
    unlearned, original = onnx_of(platform, job), onnx_of(platform, trained)
    assert onnx_accuracy(unlearned, x[y == 3], y[y == 3]) <= 0.02
    others = y != 3
    assert onnx_accuracy(unlearned, x[others], y[others]) >= onnx_accuracy(original, x[others], y[others]) - 0.01
    assert "attribution.ready" in [e["type"] for e in platform.events(job["id"])]


def test_oracle_matching_reaches_the_floor(platform, trained, digits, forget_rows, retrain_job):
    job = unlearn(platform, trained, digits, "oracle_matching", {"indices": forget_rows}, evaluate={"oracles": K})
    report = report_of(platform, job)
    assert_klom_targets(report)
    assert report["matching_oracles"]["oracles"] == report["matching_oracles"]["paired_originals"] == 8
    retrain = scores(report_of(platform, retrain_job))["unlearned (retrain)"]
    unlearned = scores(report)["unlearned (oracle_matching)"]
    for key in ("forget_accuracy", "retain_accuracy", "test_accuracy"):
        assert abs(unlearned[key] - retrain[key]) <= 0.01 + 1e-9, (key, unlearned, retrain)


@pytest.mark.parametrize("algorithm", ["finetune", "neggrad_plus", "scrub"])
def test_baselines_run_and_report(platform, trained, digits, forget_rows, algorithm):
    job = unlearn(platform, trained, digits, algorithm, {"indices": forget_rows})
    report = report_of(platform, job)
    unlearned = scores(report)[f"unlearned ({algorithm})"]
    assert unlearned["test_accuracy"] >= 0.9
    assert 0 <= unlearned["mia_auc"] <= 1
    assert report["cost"]["ratio"] > 0 and "retrain_estimate_seconds" in report["cost"]
    assert report["forget_set"]["sha256"] == forget_sha256(digits, forget_rows)
    html = platform.http.get(f"/v1/jobs/{job['id']}/artifacts/report.html").text
    assert "Forget accuracy" in html and "MIA AUC" in html and report["forget_set"]["sha256"] in html


def test_forget_set_by_uri_is_the_same_deletion(platform, trained, digits, forget_rows):
    rows = forget_rows[:40]
    body = io.BytesIO()
    np.savez(body, x=digits["train_x"][rows], y=digits["train_y"][rows])
    upload = platform.http.post("/v1/files", files={"file": ("forget.npz", body.getvalue())}).json()
    job = unlearn(platform, trained, digits, "finetune", {"uri": upload["id"]}, params={"epochs": 1})
    audit = report_of(platform, job)["forget_set"]
    assert audit["named_by"] == "uri" and audit["size"] == 40
    assert audit["sha256"] == forget_sha256(digits, rows)


# --- bad forget requests ------------------------------------------------------------------------------------------


def test_bad_forget_requests_fail_with_codes(platform, trained, digits, data_root):
    n = len(digits["train_y"])
    stranger = io.BytesIO()
    np.savez(stranger, x=np.full((2, 1, 8, 8), 0.5, dtype=np.float32), y=np.array([1, 2]))
    stranger_id = platform.http.post("/v1/files", files={"file": ("s.npz", stranger.getvalue())}).json()["id"]
    cases = {
        "forget_indices_out_of_range": ({"indices": [0, n + 5]}, digits["dataset"]),
        "forget_set_is_everything": ({"indices": list(range(n))}, digits["dataset"]),
        "forget_class_unknown": ({"class": 12}, digits["dataset"]),
        "forget_rows_not_in_dataset": ({"uri": stranger_id}, digits["dataset"]),
        "model_data_mismatch": ({"class": 1}, {"uri": f"file://{data_root}/wine_train.csv",
                                               "label_column": "cultivar"}),
    }
    jobs = {code: platform.submit({"method": "unlearn", "algorithm": "finetune", "model": {"uri": f"job://{trained['id']}"},
                                   "dataset": dataset, "forget": forget, "budget": {"max_seconds": 60}})["id"]
            for code, (forget, dataset) in cases.items()}
    for code, job_id in jobs.items():
        job = platform.wait(job_id, timeout=60)
        assert job["status"] == "failed" and job["error"]["code"] == code, (code, job)
        assert job["error"]["class"] == "user_error" and len(job["error"]["message"]) > 30


# --- SCRUB's optimizer, in process --------------------------------------------------------------------------------


def test_scrub_moves_the_student_and_never_the_teacher():
    from core.methods.unlearn import ScrubParams
    from workers.data.dataset import make_dataset
    from workers.models import build_model
    from workers.unlearning.algorithms import Scrub, make_rows
    from workers.unlearning.fitting import Deadline

    rng = np.random.default_rng(0)
    x, y = rng.random((120, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 120)
    train = make_dataset(x[:100], y[:100], uri="mem://train", classes=None)
    test = make_dataset(x[100:], y[100:], uri="mem://test", classes=train.classes)
    forget = np.zeros(100, dtype=bool)
    forget[:10] = True
    torch.manual_seed(0)
    model = build_model("mlp", {"hidden": [16]}, (1, 8, 8), 3)
    before = copy.deepcopy(model.state_dict())
    loop = Scrub(model, ScrubParams(epochs=2, max_epochs=1, lr=1e-2), make_rows(train, forget, test,
                                                                                torch.device("cpu")), 0.0, 0)
    student_params = {id(p) for p in loop.model.parameters()}
    teacher_params = {id(p) for p in loop.teacher.parameters()}
    optimised = {id(p) for group in loop.optimizer.param_groups for p in group["params"]}
    assert optimised == student_params and not optimised & teacher_params
    step = 0
    for epoch in range(2):
        _, step = loop.run_epoch(Deadline(time.time() + 60), epoch, step)
    teacher_after = loop.teacher.state_dict()
    assert all(torch.equal(before[name], teacher_after[name]) for name in before)
    assert any(not torch.equal(before[name], value) for name, value in loop.model.state_dict().items())


def test_held_out_split_follows_the_original_train_job(platform, digits, data_root):
    """Without dataset.validation the test rows are the rows the train job held out (same fraction and seed), and
    forget indices count rows of the dataset file, held-out ones included."""
    from workers.data import split_validation
    from workers.data.dataset import make_dataset

    uri = f"file://{data_root}/digits_train.npz"
    train = platform.wait(platform.submit({"method": "train", "model": {"arch": "mlp", "args": {"hidden": [32]}},
                                           "dataset": {"uri": uri, "validation": {"fraction": 0.2}},
                                           "params": {"epochs": 3}, "budget": BUDGET, "seed": 5})["id"])
    assert train["status"] == "succeeded", train["error"]
    rows = list(range(0, 300, 3))
    job = unlearn(platform, train, {"dataset": {"uri": uri}}, "finetune", {"indices": rows}, params={"epochs": 1})
    n = len(digits["train_y"])
    numbered = make_dataset(np.arange(n, dtype=np.float32)[:, None], digits["train_y"], uri="rows", classes=None)
    _, held_out = split_validation(numbered, 0.2, 5)
    held_out_rows = set(held_out.x[:, 0].astype(int).tolist())
    requested_held_out = len(held_out_rows & set(rows))
    report = report_of(platform, job)
    assert 0 < requested_held_out < len(rows)
    assert report["forget_set"]["held_out_rows"] == requested_held_out
    assert report["forget_set"]["size"] == len(rows) - requested_held_out
    assert report["unlearning"]["test_rows"] == len(held_out_rows) - requested_held_out
    assert "seed 5" in report["unlearning"]["test_rows_from"]


def test_a_loop_resumes_from_its_checkpoint_state():
    """What a new attempt does after a lost worker: rebuild the loop, load the saved state, carry on identically."""
    import json

    from core.methods.unlearn import FinetuneParams
    from workers.checkpoints import pack, unpack
    from workers.data.dataset import make_dataset
    from workers.models import build_model
    from workers.unlearning.algorithms import Finetune, make_rows
    from workers.unlearning.fitting import Deadline

    rng = np.random.default_rng(0)
    x, y = rng.random((120, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 120)
    train = make_dataset(x[:100], y[:100], uri="mem://train", classes=None)
    test = make_dataset(x[100:], y[100:], uri="mem://test", classes=train.classes)
    forget = np.arange(100) < 10
    budget = Deadline(time.time() + 60)

    def loop() -> Finetune:
        torch.manual_seed(0)
        model = build_model("mlp", {"hidden": [16], "dropout": 0.0}, (1, 8, 8), 3)
        return Finetune(model, FinetuneParams(epochs=3, lr=1e-2), make_rows(train, forget, test, torch.device("cpu")),
                        0.0, 0)

    straight = loop()
    for epoch in range(3):
        straight.run_epoch(budget, epoch, epoch * 100)
    first = loop()
    first.run_epoch(budget, 0, 0)
    groups, meta = first.state()
    resumed = loop()
    resumed.load_state(unpack(pack(groups)), json.loads(json.dumps(meta)))
    for epoch in (1, 2):
        resumed.run_epoch(budget, epoch, epoch * 100)
    for name, value in straight.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[name]), name


def test_matching_lr_auto_is_lower_for_convnets_and_layers_head_moves_only_the_output_layer():
    """lr "auto": 2e-3 for a dense model, 5e-4 for one with convolutions (algorithms.MATCHING_LR, swept on a CNN);
    layers "head": matching leaves every weight but the output layer's exactly as trained."""
    from core.methods.unlearn import DmmParams
    from workers.data.dataset import make_dataset
    from workers.models import build_model
    from workers.unlearning.algorithms import Matching, make_rows, matching_lr
    from workers.unlearning.fitting import Deadline

    rng = np.random.default_rng(0)
    x, y = rng.random((120, 1, 8, 8), dtype=np.float32), rng.integers(0, 3, 120)
    train = make_dataset(x[:100], y[:100], uri="mem://train", classes=None)
    test = make_dataset(x[100:], y[100:], uri="mem://test", classes=train.classes)
    forget = np.arange(100) < 10
    cnn = build_model("cnn", {"channels": [4, 8], "hidden": 8}, (1, 8, 8), 3)
    mlp = build_model("mlp", {"hidden": [16]}, (1, 8, 8), 3)
    assert (matching_lr("auto", cnn), matching_lr("auto", mlp), matching_lr(1e-2, cnn)) == (5e-4, 2e-3, 1e-2)
    match = np.arange(40)
    targets = rng.normal(size=(40, 3)).astype(np.float32) * 3
    before = copy.deepcopy(cnn.state_dict())
    loop = Matching(cnn, DmmParams(epochs=2, layers="head"), make_rows(train, forget, test, torch.device("cpu"), match,
                                                                       targets), 0.0, 0)
    assert loop.lr == 5e-4
    for epoch in range(2):
        loop.run_epoch(Deadline(time.time() + 60), epoch, epoch * 10)
    moved = {name for name, value in cnn.state_dict().items() if not torch.equal(value, before[name])}
    assert moved == {"body.head.weight", "body.head.bias"}, moved
