"""The distill method: its helpers on small tensors and models, then every algorithm end to end over HTTP on digits —
teachers trained by `train` jobs, students and synthetic sets scored in ONNX Runtime on rows no job saw; the
issue's quality floors with pinned seeds, transfer data, budgets, cancel, and bad input."""
import io
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.methods.distill import DatasetParams
from tests.conftest import onnx_accuracy
from workers.distillation.losses import kl_soft_loss, mse_soft_loss
from workers.distillation.students import build_student
from workers.distillation.synthetic import initial_synthetic
from workers.distillation.targets import BalancedTeachers, ensemble_logits, entropy_matching_scales, mean_entropy
from workers.distillation.teachers import Teacher
from workers.models import build_model, count_params

torch.set_num_threads(1)
DIGITS = (1, 8, 8)
# A 2-conv student of 1.7k parameters: small enough that a teacher's soft targets visibly help it on digits.
SMALL_STUDENT = {"arch": "cnn", "args": {"channels": [8, 16], "hidden": 16}}


# ---- helpers, no platform ---------------------------------------------------------------------------------------


def test_soft_losses_vanish_when_the_student_copies_the_teacher():
    logits = torch.randn(5, 10)
    assert kl_soft_loss(logits, logits, 4.0).abs().max() < 1e-5
    assert mse_soft_loss(logits, logits, 4.0).abs().max() == 0
    other = torch.randn(5, 10)
    assert (kl_soft_loss(other, logits, 4.0) > 0).all()
    # T² scaling keeps the soft gradient's size comparable across temperatures (Hinton et al.).
    student = other.clone().requires_grad_(True)
    grads = []
    for temperature in (2.0, 8.0):
        (grad,) = torch.autograd.grad(kl_soft_loss(student, logits * 8, temperature).sum(), student)
        grads.append(grad.norm())
    assert 0.2 < grads[0] / grads[1] < 5


def test_probability_averaged_ensemble_logits_reproduce_the_mean_softmax():
    members = torch.randn(3, 6, 10) * 3
    for temperature in (1.0, 4.0):
        combined = ensemble_logits(members, "probabilities", temperature)
        expected = F.softmax(members / temperature, dim=2).mean(0)
        assert torch.allclose(F.softmax(combined / temperature, dim=1), expected, atol=1e-6)
    assert torch.allclose(ensemble_logits(members, "logits"), members.mean(0))


def test_entropy_balance_equalises_the_teachers_entropy():
    sharp, soft = torch.randn(200, 10) * 10, torch.randn(200, 10)
    logits = torch.stack([sharp, soft])
    scales = entropy_matching_scales(logits, 4.0)
    before = [mean_entropy(t, 4.0) for t in logits]
    after = [mean_entropy(t * s, 4.0) for t, s in zip(logits, scales, strict=True)]
    assert abs(before[0] - before[1]) > 0.5
    assert abs(after[0] - after[1]) < 1e-3
    assert min(before) < after[0] < max(before)
    assert scales[0] < 1 < scales[1]  # the sharp teacher is softened, the soft one sharpened


def test_loss_balance_weights_the_teacher_learned_least_from():
    balance = BalancedTeachers(entropy_balance=False, loss_balance=True, strength=1.0, temperature=4.0, teachers=2)
    assert balance.weights().tolist() == [0.5, 0.5]  # plain averaging until there is something to balance
    balance.update(torch.tensor([2.0, 2.0]))
    balance.update(torch.tensor([0.5, 1.5]))  # the student learned fast from teacher 1, slowly from teacher 2
    weights = balance.weights()
    assert weights.sum() == pytest.approx(1.0) and weights[1] > weights[0]
    assert weights.tolist() == pytest.approx([0.25, 0.75])
    restored = BalancedTeachers(False, True, 1.0, 4.0, 2)
    restored.load_state(balance.state())
    assert restored.weights().tolist() == pytest.approx(weights.tolist())


def test_params_ratio_builds_a_smaller_member_of_the_teachers_family():
    from workers.data.dataset import Dataset
    rng = np.random.default_rng(0)
    data = Dataset(x=rng.random((40, 1, 8, 8), dtype=np.float32), y=np.arange(40) % 10,
                   classes=[str(i) for i in range(10)], kind="image", feature_names=None, uri="test")
    torch.manual_seed(0)
    teacher_model = build_model("cnn", {}, DIGITS, 10)
    teacher = Teacher("teacher", "model", "job://t", teacher_model, {"arch": "cnn", "args": {}})
    for ratio in (0.05, 0.25):
        student, info, built = build_student({"params_ratio": ratio}, [teacher], data, seed=0)
        assert info["arch"] == built["arch"] == "cnn" and len(built["args"]["channels"]) == 3
        assert built["params"] == count_params(student)
        assert built["params_ratio"] == pytest.approx(ratio, rel=0.15)
        assert all(s < t for s, t in zip(built["args"]["channels"], [32, 64, 64], strict=True))
    mlp = Teacher("teacher", "model", "job://t", build_model("mlp", {"hidden": [256, 128]}, DIGITS, 10),
                  {"arch": "mlp", "args": {"hidden": [256, 128]}})
    _, _, built = build_student({"params_ratio": 0.1}, [mlp], data, seed=0)
    assert built["arch"] == "mlp" and built["params_ratio"] == pytest.approx(0.1, rel=0.15)
    # Same seed, same initial weights: the from-scratch baseline is the student's exact twin.
    first, _, _ = build_student(SMALL_STUDENT, [teacher], data, seed=3)
    second, _, _ = build_student(SMALL_STUDENT, [teacher], data, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                 strict=True))


def test_representative_initialisation_picks_distinct_typical_rows():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(30, 1, 4, 4) + 5 * label for label in range(3)])
    y = torch.arange(3).repeat_interleave(30)
    synthetic, labels = initial_synthetic(x, y, 3, 4, "representative", seed=0)
    assert synthetic.shape == (12, 1, 4, 4) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for label in range(3):
        rows = synthetic[labels == label]
        assert len({tuple(r.flatten().tolist()) for r in rows}) == 4  # distinct real rows
        assert (rows.mean() - 5 * label).abs() < 1.0
    assert DatasetParams().matching == "distribution"


# ---- end to end -------------------------------------------------------------------------------------------------


def _dataset(data_root, name="digits_train.npz", fraction=0.1):
    return {"uri": f"file://{data_root}/{name}", "validation": {"fraction": fraction}}


def _artifact(platform, job_id, name):
    response = platform.http.get(f"/v1/jobs/{job_id}/artifacts/{name}")
    assert response.status_code == 200, response.text
    return response


def _succeeded(job):
    assert job["status"] == "succeeded", job["error"]
    return job


def _failed(platform, spec):
    job = platform.wait(platform.submit(spec)["id"])
    assert job["status"] == "failed", job
    return job["error"]


@pytest.fixture(scope="module")
def teachers(platform, data_root):
    """Three `train` jobs on digits with different seeds: the teacher (default CNN, 65k parameters) and two more
    ensemble members."""
    ids = [platform.submit({"method": "train", "dataset": _dataset(data_root), "params": {"epochs": 20},
                            "budget": {"max_seconds": 240}, "seed": seed})["id"] for seed in (0, 1, 2)]
    return [_succeeded(platform.wait(job_id))["id"] for job_id in ids]


@pytest.fixture(scope="module")
def test_rows(data_root):
    test = np.load(data_root / "digits_test.npz")
    return test["x"], test["y"]


@pytest.fixture(scope="module")
def kd_job(platform, data_root, teachers):
    job = platform.submit({"method": "distill", "algorithm": "kd", "model": {"uri": f"job://{teachers[0]}"},
                           "student": SMALL_STUDENT, "dataset": _dataset(data_root),
                           "params": {"baseline": True}, "budget": {"max_seconds": 240}, "seed": 0})
    return _succeeded(platform.wait(job["id"]))


def test_methods_catalog_publishes_the_distill_algorithms(platform):
    methods = {m["name"]: m for m in platform.http.get("/v1/methods").json()["data"]}
    distill = methods["distill"]
    assert distill["default_algorithm"] == "kd"
    schemas = {a["name"]: a["params_schema"] for a in distill["algorithms"]}
    assert set(schemas) == {"kd", "multi_teacher", "ensemble", "dataset"}
    assert schemas["kd"]["properties"]["temperature"]["default"] == 4.0
    assert {"entropy_balance", "loss_balance"} <= set(schemas["multi_teacher"]["properties"])
    assert {"ipc", "matching", "clip_loss", "weight_perturbation"} <= set(schemas["dataset"]["properties"])


def test_kd_student_beats_its_from_scratch_twin(platform, kd_job, teachers, test_rows):
    metrics = kd_job["result"]["metrics"]
    student_onnx = onnx_accuracy(_artifact(platform, kd_job["id"], "model.onnx").content, *test_rows)
    teacher_onnx = onnx_accuracy(_artifact(platform, teachers[0], "model.onnx").content, *test_rows)
    print(f"kd: teacher {teacher_onnx:.4f}, student {student_onnx:.4f} (onnx, held out); validation student "
          f"{metrics['student_accuracy']} baseline {metrics['baseline_accuracy']}")
    assert student_onnx >= 0.975  # the floor, on 400 rows no job saw
    assert metrics["student_accuracy"] >= metrics["baseline_accuracy"]
    assert metrics["distillation_gain"] == pytest.approx(metrics["student_accuracy"] - metrics["baseline_accuracy"])


def test_kd_report_compares_teacher_student_and_baseline(platform, kd_job, teachers):
    report = _artifact(platform, kd_job["id"], "report.json").json()
    distillation = report["distillation"]
    assert distillation["teacher_logits_cached"] is True and distillation["student"]["params"] < 2000
    assert 0.3 < distillation["student_epoch_over_baseline_epoch"] < 3  # bench/distill_kd.py measures it properly
    names = [row["name"] for row in report["comparison"]]
    assert names == ["teacher", "student (distilled)", "student from scratch (baseline)"]
    teacher_row, student_row = report["comparison"][0], report["comparison"][1]
    assert student_row["params"] < teacher_row["params"] / 20 and student_row["flops"] < teacher_row["flops"]
    assert student_row["onnx_bytes"] < teacher_row["onnx_bytes"] and student_row["latency_ms"] > 0
    assert set(report["teachers"][0]["per_class_recall"]) == {str(i) for i in range(10)}
    assert set(report["per_class"]["recall"]) == {str(i) for i in range(10)}  # the student's
    assert 0.9 < report["teachers"][0]["agreement_with_student"] <= 1.0
    assert {"soft_loss", "hard_loss", "val_accuracy", "baseline_val_accuracy"} <= set(report["curves"])
    card = _artifact(platform, kd_job["id"], "model.json").json()
    assert card["arch"] == "cnn" and card["args"]["channels"] == [8, 16]
    assert card["distillation"]["teachers"] == [f"job://{teachers[0]}"]
    html = _artifact(platform, kd_job["id"], "report.html").text
    assert "Comparison" in html and "×" in html and "<svg" in html
    types = {e["type"] for e in platform.events(kd_job["id"])}
    assert {"data.loaded", "model.built", "teachers.cached", "distill.epoch", "distill.finished",
            "artifacts.written", "job.succeeded"} <= types
    series = {m["name"]: m["points"] for m in platform.http.get(f"/v1/jobs/{kd_job['id']}/metrics").json()["data"]}
    assert [point["step"] for point in series["val_accuracy"]] == list(range(1, 101))
    assert len(series["baseline_val_accuracy"]) == 100


@pytest.fixture(scope="module")
def few_labels(platform, data_root):
    """The issue's scenario: 10% of the training rows keep their labels, the other 90% are unlabeled transfer data
    (an .npz holding `x` only); the teacher only ever saw the labeled 10%."""
    train = np.load(data_root / "digits_train.npz")
    order = np.random.default_rng(0).permutation(len(train["y"]))
    labeled, unlabeled = order[:len(order) // 10], order[len(order) // 10:]
    np.savez(data_root / "digits_labeled10.npz", x=train["x"][labeled], y=train["y"][labeled])
    np.savez(data_root / "digits_unlabeled.npz", x=train["x"][unlabeled])
    teacher = platform.submit({"method": "train", "dataset": _dataset(data_root, "digits_labeled10.npz", 0.2),
                               "params": {"epochs": 40}, "budget": {"max_seconds": 120}, "seed": 0})
    return _succeeded(platform.wait(teacher["id"]))["id"]


def test_transfer_data_labelled_by_the_teacher_lifts_a_few_label_student(platform, data_root, few_labels,
                                                                          test_rows):
    job = platform.submit({"method": "distill", "model": {"uri": f"job://{few_labels}"}, "student": SMALL_STUDENT,
                           "dataset": _dataset(data_root, "digits_labeled10.npz", 0.2),
                           "transfer": {"uri": f"file://{data_root}/digits_unlabeled.npz"},
                           "params": {"baseline": True, "epochs": 60}, "budget": {"max_seconds": 240}, "seed": 0})
    job = _succeeded(platform.wait(job["id"]))
    report = _artifact(platform, job["id"], "report.json").json()
    unlabeled = len(np.load(data_root / "digits_unlabeled.npz")["x"])
    assert report["distillation"]["transfer_rows"] == unlabeled and report["distillation"]["labeled_rows"] < 140
    student = onnx_accuracy(_artifact(platform, job["id"], "model.onnx").content, *test_rows)
    scratch = onnx_accuracy(_artifact(platform, job["id"], "baseline.onnx").content, *test_rows)
    print(f"10% labels, held out: student {student:.4f} vs the same student from scratch {scratch:.4f}")
    assert student >= scratch + 0.03  # the issue's +3 points


def test_multi_teacher_is_no_worse_than_its_best_teacher_alone(platform, data_root, teachers, kd_job, test_rows):
    mlp = platform.submit({"method": "train", "model": {"arch": "mlp"}, "dataset": _dataset(data_root),
                           "params": {"epochs": 20}, "budget": {"max_seconds": 120}, "seed": 0})
    mlp_id = _succeeded(platform.wait(mlp["id"]))["id"]
    job = platform.submit({"method": "distill", "algorithm": "multi_teacher", "student": SMALL_STUDENT,
                           "teachers": [{"uri": f"job://{teachers[0]}"}, {"uri": f"job://{mlp_id}"}],
                           "dataset": _dataset(data_root), "budget": {"max_seconds": 240}, "seed": 0})
    job = _succeeded(platform.wait(job["id"]))
    report = _artifact(platform, job["id"], "report.json").json()
    assert report["distillation"]["teacher_temperatures"] == [4.0, 4.0]  # plain averaging by default
    assert [row["name"] for row in report["comparison"]] == ["teacher 1", "teacher 2", "student (distilled)"]
    # Same student, seed and data as kd_job, which distilled the better (CNN) teacher alone.
    multi = onnx_accuracy(_artifact(platform, job["id"], "model.onnx").content, *test_rows)
    single = onnx_accuracy(_artifact(platform, kd_job["id"], "model.onnx").content, *test_rows)
    print(f"held out: multi_teacher {multi:.4f} vs kd from the best teacher alone {single:.4f}")
    assert multi >= single - 0.005  # 2 of 400 rows: seed noise, see bench/distill_teachers.py for 3-seed means


def test_ensemble_student_from_params_ratio(platform, data_root, teachers, test_rows):
    job = platform.submit({"method": "distill", "algorithm": "ensemble", "student": {"params_ratio": 0.05},
                           "teachers": [{"uri": f"job://{t}"} for t in teachers], "dataset": _dataset(data_root),
                           "params": {"epochs": 60}, "budget": {"max_seconds": 240}, "seed": 0})
    job = _succeeded(platform.wait(job["id"]))
    metrics = job["result"]["metrics"]
    report = _artifact(platform, job["id"], "report.json").json()
    assert report["comparison"][0]["name"] == "ensemble of 3"
    assert report["comparison"][0]["params"] == sum(t["params"] for t in report["teachers"])
    assert {"ensemble_accuracy", "single_member_accuracy", "gain_kept", "paper_reference"} <= set(metrics)
    card = _artifact(platform, job["id"], "model.json").json()
    built = card["distillation"]["student"]
    assert built["requested"] == {"params_ratio": 0.05} and built["family"] == "cnn" == card["arch"]
    assert built["params_ratio"] == pytest.approx(0.05, rel=0.15) and len(card["args"]["channels"]) == 3
    assert metrics["ensemble_params_over_student"] > 50
    accuracy = onnx_accuracy(_artifact(platform, job["id"], "model.onnx").content, *test_rows)
    print(f"ensemble: members {metrics['single_member_accuracy']}, ensemble {metrics['ensemble_accuracy']}, "
          f"student {metrics['student_accuracy']} (held out {accuracy:.4f}), gain kept {metrics['gain_kept']}")
    assert accuracy >= 0.97


@pytest.fixture(scope="module")
def dm_jobs(platform, data_root):
    jobs = {ipc: platform.submit({"method": "distill", "algorithm": "dataset", "dataset": _dataset(data_root),
                                  "params": {"ipc": ipc, "iterations": 300}, "budget": {"max_seconds": 240},
                                  "seed": 0})["id"]
            for ipc in (1, 10)}
    return {ipc: _succeeded(platform.wait(job_id)) for ipc, job_id in jobs.items()}


def test_distribution_matching_beats_random_real_images(platform, dm_jobs):
    for ipc, floor in ((1, 0.20), (10, 0.02)):  # the targets
        metrics = dm_jobs[ipc]["result"]["metrics"]
        print(f"dm ipc {ipc}: synthetic {metrics['synthetic_accuracy']} random {metrics['random_real_accuracy']} "
              f"full {metrics['full_data_accuracy']}")
        assert metrics["gain_over_random_real"] >= floor, metrics
        assert metrics["rows_compression"] == pytest.approx(1257 / (10 * ipc), rel=0.01)
        synthetic = np.load(io.BytesIO(_artifact(platform, dm_jobs[ipc]["id"], "synthetic.npz").content))
        assert synthetic["x"].shape == (10 * ipc, 1, 8, 8) and synthetic["x"].dtype == np.float32
        assert np.bincount(synthetic["y"]).tolist() == [ipc] * 10
    report = _artifact(platform, dm_jobs[10]["id"], "report.json").json()
    assert [row["name"] for row in report["comparison"]] == ["full data", "random real subset",
                                                             "synthetic, distilled", "synthetic, initial"]
    assert dm_jobs[10]["result"]["metrics"]["kept"] == "distilled"
    candidates = report["dataset_distillation"]["evaluation"]["candidates"]
    assert candidates["distilled"]["accuracy"] >= candidates["initial"]["accuracy"]
    assert report["dataset_distillation"]["evaluation"]["protocol"]["arch"] == "cnn"


def test_synthetic_set_trains_a_later_job(platform, dm_jobs, data_root, test_rows):
    job = platform.submit({"method": "train", "dataset": {"uri": f"job://{dm_jobs[10]['id']}/synthetic.npz",
                                                          "validation": {"uri": f"file://{data_root}/digits_test.npz"}},
                           "params": {"epochs": 60}, "budget": {"max_seconds": 120}})
    job = _succeeded(platform.wait(job["id"]))
    accuracy = onnx_accuracy(_artifact(platform, job["id"], "model.onnx").content, *test_rows)
    print(f"train job on synthetic.npz (100 rows): {accuracy:.4f}")
    assert accuracy >= 0.9


def test_trajectory_matching_with_ast_improvements_runs_end_to_end(platform, data_root):
    job = platform.submit({"method": "distill", "algorithm": "dataset", "dataset": _dataset(data_root),
                           "params": {"ipc": 1, "matching": "trajectory", "iterations": 60, "experts": 2,
                                      "expert_epochs": 4, "max_start_epoch": 2, "eval_repeats": 2},
                           "budget": {"max_seconds": 240}, "seed": 0})
    job = _succeeded(platform.wait(job["id"]))
    metrics = job["result"]["metrics"]
    report = _artifact(platform, job["id"], "report.json").json()
    print(f"tm ipc 1: synthetic {metrics['synthetic_accuracy']} random {metrics['random_real_accuracy']}")
    assert metrics["gain_over_random_real"] >= 0.1
    assert report["dataset_distillation"]["learned_student_lr"] > 0
    assert "experts.trained" in {e["type"] for e in platform.events(job["id"])}


# ---- bad input, budgets, cancel, resume -------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "param"), [
    ({"algorithm": "kd"}, "model"),
    ({"algorithm": "multi_teacher", "teachers": [{"uri": "job://job_x"}]}, "teachers"),
    ({"algorithm": "ensemble", "model": {"uri": "job://job_x"}}, "model"),
    ({"model": {"uri": "job://job_x"}, "student": {"params_ratio": 2}}, "student.params_ratio"),
    ({"model": {"uri": "job://job_x"}, "student": {"baseline": True}}, "student.baseline"),
    ({"model": {"uri": "job://job_x"}, "student": {"width": 3}}, "student.width"),
    ({"model": {"uri": "job://job_x"}, "params": {"temperature": -1}}, "params.temperature"),
    ({"model": {"uri": "job://job_x"}, "params": {"hint_weight": 1, "teachers": 2}}, "params.teachers"),
    ({"algorithm": "dataset", "student": {"params_ratio": 0.1}}, "student.params_ratio"),
    ({"algorithm": "dataset", "model": {"uri": "job://job_x"}}, "model"),
    ({"algorithm": "dataset", "params": {"matching": "trajectory", "max_start_epoch": 9}}, "params"),
])
def test_bad_specs_are_422_naming_the_field(platform, spec, param):
    response = platform.http.post("/v1/jobs", json={"method": "distill", "dataset": {"uri": "builtin://digits"},
                                                    **spec})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param, response.json()


@pytest.fixture(scope="module")
def wine_model(platform, data_root):
    job = platform.submit({"method": "train", "dataset": {"uri": f"file://{data_root}/wine_train.csv",
                                                          "label_column": "cultivar"},
                           "params": {"epochs": 2}, "budget": {"max_seconds": 60}})
    return _succeeded(platform.wait(job["id"]))["id"]


def test_mismatched_teachers_and_oversized_ipc_fail_with_codes(platform, data_root, teachers, wine_model):
    error = _failed(platform, {"method": "distill", "model": {"uri": f"job://{wine_model}"},
                               "dataset": _dataset(data_root), "budget": {"max_seconds": 60}})
    assert error["code"] == "model_data_mismatch" and error["message"].startswith("model:"), error
    error = _failed(platform, {"method": "distill", "algorithm": "ensemble", "dataset": _dataset(data_root),
                               "teachers": [{"uri": f"job://{teachers[0]}"}, {"uri": f"job://{wine_model}"}],
                               "budget": {"max_seconds": 60}})
    assert error["code"] == "model_data_mismatch" and error["message"].startswith("teachers[1]:"), error
    error = _failed(platform, {"method": "distill", "algorithm": "dataset", "dataset": _dataset(data_root),
                               "params": {"ipc": 500}, "budget": {"max_seconds": 60}})
    assert error["code"] == "ipc_too_large" and "at most" in error["message"], error
    error = _failed(platform, {"method": "distill", "model": {"uri": f"job://{teachers[0]}"},
                               "dataset": _dataset(data_root), "budget": {"max_seconds": 60},
                               "transfer": {"uri": f"file://{data_root}/wine_test.npz"}})
    assert error["code"] == "transfer_mismatch" and error["message"].startswith("transfer:"), error


def test_budget_stops_cleanly_keeping_the_best_student(platform, data_root, teachers):
    job = platform.submit({"method": "distill", "model": {"uri": f"job://{teachers[0]}"}, "student": SMALL_STUDENT,
                           "dataset": _dataset(data_root), "params": {"epochs": 5000},
                           "budget": {"max_seconds": 5}})
    job = _succeeded(platform.wait(job["id"]))
    assert job["result"]["stopped_by"] == "budget" and job["result"]["metrics"]["student_accuracy"] > 0.8
    assert "budget.exhausted" in {e["type"] for e in platform.events(job["id"])}
    _artifact(platform, job["id"], "model.onnx")


def test_cancel_stops_a_running_distillation(platform, data_root):
    job = platform.submit({"method": "distill", "algorithm": "dataset", "dataset": _dataset(data_root),
                           "params": {"iterations": 100000}, "budget": {"max_seconds": 300}})
    platform.wait(job["id"], until=("running",))
    response = platform.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    stopped = platform.wait(job["id"])
    assert stopped["status"] == "cancelled" and stopped["result"]["stopped_by"] == "cancelled"


def test_a_killed_worker_resumes_multi_teacher_distillation_from_its_checkpoint(platform, data_root, teachers):
    job = platform.submit({"method": "distill", "algorithm": "multi_teacher", "student": SMALL_STUDENT,
                           "teachers": [{"uri": f"job://{t}"} for t in teachers[:2]], "dataset": _dataset(data_root),
                           "params": {"epochs": 80, "baseline": True, "entropy_balance": True, "loss_balance": True},
                           "budget": {"max_seconds": 300}, "seed": 1})
    deadline = time.time() + 120
    while time.time() < deadline and "checkpoint.saved" not in [e["type"] for e in platform.events(job["id"])]:
        time.sleep(0.2)
    platform.kill_worker()
    platform.start_worker()
    done = _succeeded(platform.wait(job["id"], timeout=240))
    assert done["attempt"] == 2
    resumed = [e for e in platform.events(job["id"]) if e["type"] == "job.resumed"]
    assert resumed and resumed[0]["data"]["step"] > 0
    series = {m["name"]: m["points"] for m in platform.http.get(f"/v1/jobs/{done['id']}/metrics").json()["data"]}
    assert [p["step"] for p in series["val_accuracy"]] == list(range(1, 81))  # replayed epochs replaced
    assert [p["step"] for p in series["baseline_val_accuracy"]] == list(range(1, 81))
    # MTARD's state came back with the checkpoint: the loss weights kept moving and still sum to one.
    weights = [p["value"] for p in series["weight_teacher_1"]]
    assert len(set(weights)) > 1 and all(0 < w < 1 for w in weights)
    distillation = _artifact(platform, done["id"], "report.json").json()["distillation"]
    assert sum(distillation["teacher_loss_weights"]) == pytest.approx(1.0, abs=1e-3)
    assert len(set(distillation["teacher_temperatures"])) == 2
