"""The prune method: its helpers on small models, then every algorithm end to end over HTTP on digits — a trained
CNN pruned unstructured, structured, class-aware and lottery-style, each model.onnx scored in ONNX Runtime on rows
the jobs never saw; sweeps, budgets, cancel, a resumed attempt and bad input."""
import copy
import json
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from core.catalog import METHODS
from core.methods.prune import ClassAwareParams, LotteryParams, MagnitudeParams, StructuredParams
from tests.conftest import onnx_accuracy
from workers.models import build_model, count_flops, count_params, load_model
from workers.pruning.channels import (
    cost,
    cost_after,
    group_sizes,
    kept_channels,
    rebuild,
    remove_channels,
    smallest_ratio,
    uniform_widths,
    widths_for,
)
from workers.pruning.masks import dense_masks, magnitude_masks, prunable_weights, sparsity_of, sparsity_schedule

torch.set_num_threads(1)
DIGITS = (1, 8, 8)


# ---- helpers, no platform ---------------------------------------------------------------------------------------


def test_cubic_schedule_prunes_fast_first_and_ends_on_target():
    steps = sparsity_schedule(0.0, 0.9, 5, "cubic")
    assert steps[-1] == pytest.approx(0.9)
    gains = np.diff([0.0, *steps])
    assert all(gains > 0) and all(np.diff(gains) < 0)  # every step prunes, each less than the one before
    assert sparsity_schedule(0.2, 0.6, 4, "linear") == pytest.approx([0.3, 0.4, 0.5, 0.6])


@pytest.mark.parametrize("score", ["lamp", "magnitude"])
def test_global_masks_hit_the_target_and_only_grow(score):
    torch.manual_seed(0)
    model = build_model("cnn", {}, DIGITS, 10)
    masks = dense_masks(model)
    previous = masks
    for sparsity in (0.5, 0.8, 0.95):
        masks = magnitude_masks(model, sparsity, "global", score, masks)
        with torch.no_grad():
            for name, weight in prunable_weights(model).items():
                weight.mul_(masks[name])
        assert sparsity_of(model)["sparsity"] == pytest.approx(sparsity, abs=1e-4)
        assert all((masks[name] <= previous[name]).all() for name in masks)  # pruned weights stay pruned
        previous = masks
    if score == "lamp":
        # LAMP ranks within layers, so a global threshold leaves every layer some weights.
        assert max(sparsity_of(model)["per_layer"].values()) < 1.0


def test_layer_scope_prunes_every_layer_alike():
    model = build_model("mlp", {"hidden": [64, 32]}, DIGITS, 10)
    masks = magnitude_masks(model, 0.7, "layer", "magnitude", dense_masks(model))
    shares = [1 - mask.float().mean().item() for mask in masks.values()]
    assert shares == pytest.approx([0.7] * len(shares), abs=0.01)


def test_kept_channels_fall_monotonically_in_multiples():
    counts = [kept_channels(64, ratio / 100, 16) for ratio in range(100)]
    assert counts == sorted(counts, reverse=True)
    assert set(counts) <= {16, 32, 48, 64} and counts[-1] == 16
    assert kept_channels(12, 0.9, 16) == 12  # groups smaller than round_to stay whole
    assert kept_channels(64, 0.999, None) == 1


def test_structured_pruning_handles_residual_blocks_and_rebuilds():
    shape = (3, 32, 32)
    torch.manual_seed(0)
    model = build_model("resnet20", {}, shape, 10).eval()
    before_params, before_flops = count_params(model), count_flops(model, shape)
    pruned = copy.deepcopy(model)
    remove_channels(pruned, shape, uniform_widths(group_sizes(model, shape), 0.5, 8), "l2")
    pruned = rebuild("resnet20", {}, pruned, shape, 10)
    assert count_params(pruned) < 0.35 * before_params and count_flops(pruned, shape) < 0.35 * before_flops
    widths = pruned.body.widths()
    assert all(width % 8 == 0 for width in widths["widths"] + widths["inner_widths"])
    assert pruned(torch.randn(2, *shape)).shape == (2, 10)
    assert 0 < smallest_ratio(model, shape, "flops", None) < 0.05
    assert cost(pruned, "params", shape) == count_params(pruned)


@pytest.mark.parametrize("round_to", [None, 16])
def test_widths_for_a_goal_stay_within_it_and_close_to_it(round_to):
    model = build_model("cnn", {}, DIGITS, 10)
    goal = 0.25 * count_params(model)
    widths, reached = widths_for(model, DIGITS, goal, "params", round_to)
    assert reached <= goal and reached == cost_after(model, DIGITS, widths, "params")
    assert reached > 0.2 * count_params(model)  # giving channels back undoes most of the rounding's overshoot
    if round_to:
        assert all(width % round_to == 0 for width in widths)


def test_catalog_discovers_the_prune_algorithms():
    assert set(METHODS["prune"].algorithms) == {"magnitude", "lottery", "structured", "class_aware"}


def test_params_models_validate_targets():
    assert MagnitudeParams().target_sparsity == 0.8
    assert MagnitudeParams(sweep=[0.5, 0.9]).target_sparsity is None
    assert StructuredParams().target_flops_ratio == 0.5
    assert StructuredParams(target_params_ratio=0.25).target_flops_ratio is None
    for bad in ({"target_sparsity": 1.0}, {"target_sparsity": 0.0}, {"target_sparsity": 0.5, "sweep": [0.6, 0.7]},
                {"sweep": [0.5, 0.5]}, {"steps": 0}):
        with pytest.raises(ValueError):
            MagnitudeParams.model_validate(bad)
    with pytest.raises(ValueError):
        StructuredParams(target_flops_ratio=0.5, target_params_ratio=0.5)
    with pytest.raises(ValueError):
        LotteryParams(rewind_epoch=5, epochs_per_round=5)
    with pytest.raises(ValueError):
        ClassAwareParams(protected_classes=[3, 3])
    dumped = MagnitudeParams(sweep=[0.5, 0.9]).model_dump(mode="json")
    assert MagnitudeParams.model_validate(dumped).sweep == [0.5, 0.9]  # the stored spec validates again in the worker


# ---- end to end -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(platform, data_root):
    """The CNN every prune job starts from: 15 epochs on the digits training file, validation split seeded 0."""
    job = platform.submit({"method": "train", "dataset": dataset(data_root), "params": {"epochs": 15},
                           "budget": {"max_seconds": 240}, "seed": 0})
    job = platform.wait(job["id"])
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="module")
def test_rows(data_root):
    rows = np.load(data_root / "digits_test.npz")
    return rows["x"], rows["y"]


def dataset(data_root, validation=None) -> dict:
    return {"uri": f"file://{data_root}/digits_train.npz", "validation": validation or {"fraction": 0.1}}


def prune(platform, data_root, trained, algorithm: str, params: dict, **extra) -> dict:
    spec = {"method": "prune", "algorithm": algorithm, "model": {"uri": f"job://{trained['id']}"},
            "dataset": dataset(data_root), "params": params, "budget": {"max_seconds": 300}, "seed": 0, **extra}
    return platform.submit(spec)


def artifact(platform, job: dict, name: str) -> bytes:
    response = platform.http.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
    assert response.status_code == 200, (name, response.text)
    return response.content


def weight_sparsity(tensors: dict[str, np.ndarray]) -> float:
    """Zero share of the conv and linear weights (tensors of two or more dimensions)."""
    weights = [tensor for tensor in tensors.values() if tensor.ndim >= 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)


def onnx_weights(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    graph = onnx.load_from_string(onnx_bytes).graph
    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def false_negatives(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray, label: int) -> int:
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    predicted = session.run(None, {"input": x.astype(np.float32)})[0].argmax(1)
    return int(((y == label) & (predicted != label)).sum())


def test_catalog_publishes_the_prune_algorithms(platform):
    methods = {m["name"]: m for m in platform.http.get("/v1/methods").json()["data"]}
    prune_method = methods["prune"]
    assert prune_method["default_algorithm"] == "magnitude"
    schemas = {a["name"]: a["params_schema"]["properties"] for a in prune_method["algorithms"]}
    assert set(schemas) == {"magnitude", "lottery", "structured", "class_aware"}
    assert {"target_sparsity", "sweep", "steps", "scope"} <= set(schemas["magnitude"])
    assert {"target_flops_ratio", "target_params_ratio", "importance", "distill"} <= set(schemas["structured"])
    assert {"protected_classes", "max_fn_increase"} <= set(schemas["class_aware"])
    assert {"rounds", "rewind_epoch"} <= set(schemas["lottery"])


@pytest.mark.parametrize(("algorithm", "params", "model", "param"), [
    ("magnitude", {"target_sparsity": 1.0}, "job", "params.target_sparsity"),
    ("magnitude", {"target_sparsity": 0}, "job", "params.target_sparsity"),
    ("structured", {"target_params_ratio": 1.5}, "job", "params.target_params_ratio"),
    ("structured", {"target_params_ratio": 0.3, "target_flops_ratio": 0.3}, "job", "params"),
    ("structured", {"importance": "random"}, "job", "params.importance"),
    ("class_aware", {}, "job", "params.protected_classes"),
    ("lottery", {"rewind_epoch": 10, "epochs_per_round": 10}, "job", "params"),
    ("magnitude", {}, None, "model.uri"),
    ("magnitude", {}, "bare", "model.arch"),
])
def test_bad_prune_specs_are_422_naming_the_field(platform, algorithm, params, model, param):
    refs = {"job": {"uri": "job://job_anything"}, "bare": {"uri": "file_abc"}, None: {"arch": "cnn"}}
    spec = {"method": "prune", "algorithm": algorithm, "model": refs[model],
            "dataset": {"uri": "builtin://digits"}, "params": params}
    response = platform.http.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_magnitude_to_90_percent_keeps_accuracy_with_zeros_in_the_files(platform, data_root, trained, test_rows):
    job = platform.wait(prune(platform, data_root, trained, "magnitude", {"target_sparsity": 0.9})["id"])
    assert job["status"] == "succeeded", job["error"]
    metrics = job["result"]["metrics"]
    assert job["result"]["stopped_by"] == "completed" and metrics["target_reached"] is True
    model_onnx = artifact(platform, job, "model.onnx")
    accuracy = onnx_accuracy(model_onnx, *test_rows)
    assert accuracy >= 0.97, accuracy
    # The zeros are real in both files a user downloads, not masks applied at run time.
    assert weight_sparsity(load_safetensors(artifact(platform, job, "model.safetensors"))) >= 0.899
    assert weight_sparsity(onnx_weights(model_onnx)) >= 0.89
    report = json.loads(artifact(platform, job, "report.json"))
    assert report["pruning"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert len(report["per_layer_sparsity"]) == 5 and max(report["per_layer_sparsity"].values()) < 1.0
    original, pruned = report["comparison"]
    assert original["name"] == "original" and pruned["params"] == original["params"]  # same shape, zeros inside
    assert pruned["gzip_bytes"] < 0.5 * original["gzip_bytes"]
    assert "does not speed up" in report["pruning"]["note"]
    assert {"recall_before", "recall_after", "false_negatives_before", "false_negatives_after"} <= set(
        report["per_class_change"][0])
    series = {m["name"]: m["points"] for m in platform.http.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]}
    assert {"train_loss", "val_accuracy", "sparsity", "lr"} <= set(series)
    assert series["sparsity"][-1]["value"] == pytest.approx(0.9, abs=1e-3)
    types = [e["type"] for e in platform.events(job["id"])]
    for phase in ("data.loaded", "model.loaded", "prune.plan", "prune.step", "prune.epoch", "prune.point",
                  "prune.finished", "artifacts.written", "job.succeeded"):
        assert phase in types, phase
    print(f"magnitude 90%: held-out ONNX accuracy {accuracy:.4f}")


def test_structured_to_a_quarter_of_the_params_is_a_smaller_model(platform, data_root, trained, test_rows, tmp_path):
    job = platform.wait(prune(platform, data_root, trained, "structured", {"target_params_ratio": 0.25})["id"])
    assert job["status"] == "succeeded", job["error"]
    original_card = json.loads(artifact(platform, trained, "model.json"))
    card = json.loads(artifact(platform, job, "model.json"))
    assert card["params"] <= 0.25 * original_card["params"]
    assert all(after < before for after, before in zip(card["widths"]["channels"],
                                                        original_card["widths"]["channels"], strict=True))
    model_onnx = artifact(platform, job, "model.onnx")
    accuracy = onnx_accuracy(model_onnx, *test_rows)
    assert accuracy >= 0.97, accuracy
    # model.json + model.safetensors alone rebuild it, and it answers like model.onnx.
    (tmp_path / "model.safetensors").write_bytes(artifact(platform, job, "model.safetensors"))
    reloaded = load_model(card, tmp_path / "model.safetensors")
    original = load_model(original_card, _saved(tmp_path / "original.safetensors",
                                                 artifact(platform, trained, "model.safetensors")))
    assert count_params(reloaded) == card["params"]
    assert count_flops(reloaded, DIGITS) <= 0.3 * count_flops(original, DIGITS)
    import onnxruntime as ort
    x = test_rows[0][:32].astype(np.float32)
    onnx_logits = ort.InferenceSession(model_onnx, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.inference_mode():
        assert np.abs(reloaded(torch.from_numpy(x)).numpy() - onnx_logits).max() < 1e-4
    assert sum(w.size for w in onnx_weights(model_onnx).values()) < 0.3 * sum(
        w.size for w in onnx_weights(artifact(platform, trained, "model.onnx")).values())
    report = json.loads(artifact(platform, job, "report.json"))
    metrics = job["result"]["metrics"]
    assert metrics["params_ratio"] <= 0.25 and metrics["flops_ratio"] < 0.3 and metrics["onnx_size_ratio"] < 0.3
    for name in ("latency_ms", "latency_b64_ms"):  # measured before and after; timings are judged in bench/
        assert all(row[name] > 0 for row in report["comparison"])
    assert {row["layer"] for row in report["per_layer_channels"]} >= {"body.features.0", "body.hidden.0"}
    assert "channels" in report["pruning"]["note"]
    print(f"structured: params ×{metrics['params_ratio']}, FLOPs ×{metrics['flops_ratio']}, held-out ONNX accuracy "
          f"{accuracy:.4f}, ORT b64 latency ×{metrics['latency_b64_ratio']}")


def _saved(path, content: bytes):
    path.write_bytes(content)
    return path


def test_class_aware_keeps_protected_false_negatives(platform, data_root, trained, test_rows):
    protected = [3, 8]
    spec_validation = {"uri": f"file://{data_root}/digits_test.npz"}
    job = platform.wait(prune(platform, data_root, trained, "class_aware",
                              {"protected_classes": protected, "target_sparsity": 0.85},
                              dataset=dataset(data_root, spec_validation))["id"])
    assert job["status"] == "succeeded", job["error"]
    metrics = job["result"]["metrics"]
    assert metrics["sparsity"] >= 0.8
    # Checked independently in ONNX Runtime on the validation file the job was given.
    before, after = artifact(platform, trained, "model.onnx"), artifact(platform, job, "model.onnx")
    for label in protected:
        assert false_negatives(after, *test_rows, label) <= false_negatives(before, *test_rows, label) + 1, label
    assert onnx_accuracy(after, *test_rows) >= 0.95
    rows = json.loads(artifact(platform, job, "report.json"))["protected_classes"]
    assert [row["class"] for row in rows] == ["3", "8"] and all(row["within_bound"] for row in rows)


def test_structured_sweep_writes_a_model_per_point_and_the_frontier(platform, data_root, trained, test_rows):
    job = platform.wait(prune(platform, data_root, trained, "structured",
                              {"sweep": [0.5, 0.2], "steps": 2, "epochs_per_step": 1, "final_epochs": 3})["id"])
    assert job["status"] == "succeeded", job["error"]
    names = {a["name"] for a in platform.http.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
    assert {f"model-{point}.{suffix}" for point in ("0.5", "0.2") for suffix in ("onnx", "safetensors", "json")} <= names
    sizes = {point: len(artifact(platform, job, f"model-{point}.onnx")) for point in ("0.5", "0.2")}
    assert sizes["0.2"] < sizes["0.5"]
    report = json.loads(artifact(platform, job, "report.json"))
    rows = report["comparison"]
    assert [row["name"] for row in rows] == ["original", "0.5× FLOPs", "0.2× FLOPs"]
    assert all(row["flops"] <= ratio * rows[0]["flops"] for row, ratio in zip(rows[1:], (0.5, 0.2), strict=True))
    assert sum(row.get("chosen", False) for row in rows) == 1
    chosen = next(row for row in rows if row.get("chosen"))
    assert json.loads(artifact(platform, job, "model.json"))["params"] == chosen["params"]
    frontier = report["curves"]["frontier_accuracy_by_flops"]
    assert frontier["x_label"] == "flops" and len(frontier["points"]) == 2
    for point in ("0.5", "0.2"):
        assert onnx_accuracy(artifact(platform, job, f"model-{point}.onnx"), *test_rows) >= 0.95, point


def test_lottery_ticket_trains_from_its_rewind_point(platform, data_root, trained, test_rows):
    job = platform.wait(prune(platform, data_root, trained, "lottery",
                              {"target_sparsity": 0.8, "rounds": 2, "epochs_per_round": 6})["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["metrics"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert onnx_accuracy(artifact(platform, job, "model.onnx"), *test_rows) >= 0.95
    rounds = json.loads(artifact(platform, job, "report.json"))["rounds"]
    assert [row["round"] for row in rounds] == [0, 1, 2] and rounds[0]["sparsity"] == 0.0
    types = [e["type"] for e in platform.events(job["id"])]
    assert types.count("lottery.rewound") == 2 and "lottery.rewind_point" in types


def test_budget_stops_between_steps_and_keeps_the_last_model(platform, data_root, trained):
    job = prune(platform, data_root, trained, "magnitude", {"target_sparsity": 0.9, "steps": 6},
                budget={"max_seconds": 300, "max_steps": 70})
    job = platform.wait(job["id"])
    assert job["status"] == "succeeded", job["error"]
    metrics = job["result"]["metrics"]
    assert job["result"]["stopped_by"] == "budget" and metrics["target_reached"] is False
    assert 0.3 < metrics["sparsity"] < 0.9 and metrics["accuracy"] > 0.9
    assert "budget.exhausted" in [e["type"] for e in platform.events(job["id"])]


def test_cancel_stops_a_running_prune_job(platform, data_root, trained):
    job = prune(platform, data_root, trained, "magnitude", {"epochs_per_step": 200})
    deadline = time.time() + 60
    while time.time() < deadline and "prune.epoch" not in [e["type"] for e in platform.events(job["id"])]:
        time.sleep(0.2)
    assert platform.http.post(f"/v1/jobs/{job['id']}/cancel").json()["cancel_requested"] is True
    stopped = platform.wait(job["id"], timeout=60)
    assert stopped["status"] == "cancelled" and stopped["result"]["stopped_by"] == "cancelled"


def test_structured_job_resumes_after_a_sigkill_with_its_pruned_widths(platform, data_root, trained, test_rows):
    job = prune(platform, data_root, trained, "structured",
                {"target_params_ratio": 0.25, "steps": 3, "epochs_per_step": 6, "final_epochs": 8})
    deadline = time.time() + 120
    while time.time() < deadline:  # a checkpoint taken after the first channels went
        events = platform.events(job["id"])
        steps = [i for i, e in enumerate(events) if e["type"] == "prune.step" and e["data"]["stage"] >= 2]
        if steps and any(e["type"] == "checkpoint.saved" for e in events[steps[0]:]):
            break
        time.sleep(0.2)
    platform.kill_worker()
    platform.start_worker()
    done = platform.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    assert "job.resumed" in [e["type"] for e in platform.events(job["id"])]
    assert done["result"]["metrics"]["params_ratio"] <= 0.25
    assert onnx_accuracy(artifact(platform, done, "model.onnx"), *test_rows) >= 0.97


def test_bad_input_fails_the_job_with_a_code(platform, data_root, trained):
    logistic = platform.wait(platform.submit({
        "method": "train", "model": {"arch": "mlp", "args": {"hidden": []}}, "dataset": dataset(data_root),
        "params": {"epochs": 1}, "budget": {"max_seconds": 60}})["id"])
    foreign = platform.http.post("/v1/files", files={"file": ("w.safetensors", _foreign_weights())}).json()["id"]
    cases = {
        "nothing_to_prune": prune(platform, data_root, logistic, "structured", {"target_params_ratio": 0.5}),
        "target_unreachable": prune(platform, data_root, trained, "structured", {"target_params_ratio": 0.001}),
        "unknown_class": prune(platform, data_root, trained, "class_aware", {"protected_classes": [12]}),
        "job_not_found": prune(platform, data_root, {"id": "job_doesnotexist"}, "magnitude", {}),
        "weights_mismatch": platform.submit({"method": "prune", "model": {"uri": foreign, "arch": "cnn"},
                                             "dataset": dataset(data_root), "budget": {"max_seconds": 60}}),
    }
    for code, job in cases.items():
        job = platform.wait(job["id"], timeout=120)
        assert job["status"] == "failed", (code, job)
        assert job["error"]["code"] == code, job["error"]
        assert job["error"]["class"] == "user_error" and len(job["error"]["message"]) > 20


def _foreign_weights() -> bytes:
    """Weights of some other network: safetensors, but not shaped like any Refinery architecture."""
    return save_safetensors({"encoder.layer0.weight": np.zeros((8, 3), dtype=np.float32)})
