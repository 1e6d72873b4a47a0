"""Multi-device jobs over HTTP on the real platform: a `train` job on 2 gloo ranks (resources.devices 2, class cpu-x2)
matches the same job on one process at the same global batch and seed; kd, prune and unlearn fine-tunes train on 2
ranks; a cancel stops every rank; a rank killed mid-run abandons its attempt, which the reaper requeues and the next
attempt resumes from its checkpoint; the ranks of a killed worker stop with it. A 2-node job (resources.nodes 2,
class cpu-n2) runs on two worker processes of this machine joined by a c10d rendezvous on 127.0.0.1, matches the
1-process job too, and a killed node requeues its attempt."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_tensors

from core.spec import Resources
from tests.conftest import ROOT, onnx_accuracy
from workers import distributed
from workers.errors import JobFailure

DIGITS = {"uri": "builtin://digits", "validation": {"fraction": 0.2}}
# No dropout: the 2-rank run then computes the 1-process run's gradients exactly, up to float summation order.
MLP = {"arch": "mlp", "args": {"hidden": [64], "dropout": 0.0}}
PARAMS = {"epochs": 4, "batch_size": 64, "lr": 0.003, "optimizer": "adam", "schedule": "constant"}
TWO_RANKS = {"accelerator": "cpu", "devices": 2}
TWO_NODES = {"accelerator": "cpu", "devices": 1, "nodes": 2}


def train_spec(resources: dict | None = None, epochs: int = 4) -> dict:
    spec = {"method": "train", "model": MLP, "dataset": DIGITS, "params": {**PARAMS, "epochs": epochs},
            "budget": {"max_seconds": 300}, "seed": 3}
    return {**spec, "resources": resources} if resources else spec


def succeeded(platform, job_id: str) -> dict:
    job = platform.wait(job_id, timeout=240)
    assert job["status"] == "succeeded", (job.get("error"), platform.worker_log()[-4000:])
    return job


def artifact(platform, job_id: str, name: str) -> bytes:
    response = platform.http.get(f"/v1/jobs/{job_id}/artifacts/{name}")
    assert response.status_code == 200, response.text
    return response.content


def of_type(events: list[dict], type_: str) -> list[dict]:
    return [e for e in events if e["type"] == type_]


@pytest.fixture(scope="module")
def one_and_two(platform):
    """The same train job on 1 process and on 2 ranks (submitted together: one worker runs them in turn)."""
    one = platform.submit(train_spec())
    two = platform.submit(train_spec(TWO_RANKS))
    return succeeded(platform, one["id"]), succeeded(platform, two["id"])


def matches_one_process(platform, one: dict, two: dict) -> float:
    """Asserts that `two` trained the model `one` did (weights within 1e-5, the same loss curve and accuracy);
    returns the largest weight difference."""
    weights = [load_tensors(artifact(platform, job["id"], "model.safetensors")) for job in (one, two)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_allclose(weights[1][name], weights[0][name], atol=1e-5, rtol=0, err_msg=name)
    # The same curves epoch by epoch (the loss is the mean over both ranks' rows), the same validation accuracy.
    curves = [job["result"]["metrics"] for job in (one, two)]
    assert abs(curves[0]["accuracy"] - curves[1]["accuracy"]) <= 0.01, curves
    series = [platform.http.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "train_loss"}).json()
              for job in (one, two)]
    losses = [[point["value"] for point in s["data"][0]["points"]] for s in series]
    assert len(losses[0]) == len(losses[1]) == PARAMS["epochs"]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    return max(float(np.abs(weights[1][name] - weights[0][name]).max()) for name in weights[0])


def test_two_rank_train_job_matches_one_process(platform, one_and_two, data_root):
    one, two = one_and_two
    assert two["spec"]["resources"]["devices"] == 2
    matches_one_process(platform, one, two)
    # The deployable model a user downloads answers like the 1-process one on rows neither job saw.
    test = np.load(data_root / "digits_test.npz")
    accuracies = [onnx_accuracy(artifact(platform, job["id"], "model.onnx"), test["x"], test["y"]) for job in (one, two)]
    assert accuracies[1] > 0.85 and abs(accuracies[0] - accuracies[1]) <= 0.01, accuracies


def test_the_events_say_the_job_ran_on_two_ranks(platform, one_and_two):
    one, two = one_and_two
    started = of_type(platform.events(two["id"]), "distributed.started")
    assert len(started) == 1, started
    data = started[0]["data"]
    assert data["world_size"] == 2 and data["backend"] == "gloo"
    assert [r["rank"] for r in data["ranks"]] == [0, 1] and len({r["pid"] for r in data["ranks"]}) == 2
    assert not of_type(platform.events(one["id"]), "distributed.started")
    # One attempt; the progress the worker's heartbeat published is rank 0's, counted in global steps as one
    # process counts them.
    assert two["attempt"] == 1
    assert two["progress"]["step"] == two["progress"]["total_steps"] == one["progress"]["step"], two["progress"]


def test_kd_student_trains_on_two_ranks(platform, one_and_two, data_root):
    teacher = one_and_two[0]
    job = platform.submit({"method": "distill", "algorithm": "kd", "model": {"uri": f"job://{teacher['id']}"},
                           "student": {"arch": "mlp", "args": {"hidden": [32], "dropout": 0.0}}, "dataset": DIGITS,
                           "params": {"epochs": 3, "batch_size": 64}, "resources": TWO_RANKS,
                           "budget": {"max_seconds": 300}, "seed": 0})
    job = succeeded(platform, job["id"])
    assert of_type(platform.events(job["id"]), "distributed.started")[0]["data"]["world_size"] == 2
    test = np.load(data_root / "digits_test.npz")
    assert onnx_accuracy(artifact(platform, job["id"], "model.onnx"), test["x"], test["y"]) > 0.8
    # Dataset distillation has its own loop, not the data-parallel one: refused before any rank starts.
    refused = platform.submit({"method": "distill", "algorithm": "dataset",
                               "dataset": DIGITS, "resources": TWO_RANKS, "budget": {"max_seconds": 60}})
    refused = platform.wait(refused["id"], timeout=60)
    assert refused["status"] == "failed" and refused["error"]["code"] == "devices_unsupported", refused["error"]
    assert "resources.devices 1" in refused["error"]["message"]


def test_prune_and_unlearn_fine_tune_on_two_ranks(platform, one_and_two, data_root):
    """The pruning and unlearning fine-tunes go through the same data-parallel loop."""
    original = f"job://{one_and_two[0]['id']}"
    prune = platform.submit({"method": "prune", "algorithm": "magnitude", "model": {"uri": original},
                             "dataset": DIGITS, "resources": TWO_RANKS, "budget": {"max_seconds": 300}, "seed": 0,
                             "params": {"target_sparsity": 0.5, "steps": 2, "epochs_per_step": 1, "final_epochs": 1}})
    unlearn = platform.submit({"method": "unlearn", "algorithm": "finetune", "model": {"uri": original},
                               "dataset": DIGITS, "forget": {"class": 3}, "params": {"epochs": 2},
                               "resources": TWO_RANKS, "budget": {"max_seconds": 300}, "seed": 0})
    prune, unlearn = succeeded(platform, prune["id"]), succeeded(platform, unlearn["id"])
    for job in (prune, unlearn):
        assert of_type(platform.events(job["id"]), "distributed.started")[0]["data"]["world_size"] == 2
    assert abs(prune["result"]["metrics"]["sparsity"] - 0.5) < 0.01
    assert prune["result"]["metrics"]["accuracy"] > 0.85
    assert unlearn["result"]["metrics"]["retain_accuracy"] > 0.85


def test_a_budget_stops_every_rank_at_the_same_step(platform):
    spec = train_spec(TWO_RANKS)
    job = succeeded(platform, platform.submit({**spec, "budget": {"max_seconds": 300, "max_steps": 30}})["id"])
    assert job["result"]["stopped_by"] == "budget"
    report = platform.http.get(f"/v1/jobs/{job['id']}/artifacts/report.json").json()
    assert report["training"]["steps"] == 30 and report["training"]["epochs_run"] == 1, report["training"]


def test_cancel_reaches_every_rank(platform):
    job = platform.submit(train_spec(TWO_RANKS, epochs=200))
    deadline = time.time() + 120
    while not of_type(platform.events(job["id"]), "train.epoch"):
        assert time.time() < deadline and platform.job(job["id"])["status"] in ("queued", "running")
        time.sleep(0.2)
    assert platform.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    job = platform.wait(job["id"], timeout=60)
    assert job["status"] == "cancelled" and job["result"]["stopped_by"] == "cancelled", job
    ranks = of_type(platform.events(job["id"]), "distributed.started")[0]["data"]["ranks"]
    for rank in ranks:
        with pytest.raises(ProcessLookupError):
            os.kill(rank["pid"], 0)


def test_a_killed_rank_requeues_the_attempt_and_the_next_resumes(platform):
    job = platform.submit(train_spec(TWO_RANKS, epochs=40))
    deadline, ranks = time.time() + 120, None
    while time.time() < deadline:  # rank 1's pid, once a checkpoint exists to resume from
        events = platform.events(job["id"])
        started = of_type(events, "distributed.started")
        if started and of_type(events, "checkpoint.saved"):
            ranks = started[0]["data"]["ranks"]
            break
        assert platform.job(job["id"])["status"] in ("queued", "running")
        time.sleep(0.2)
    assert ranks is not None, platform.worker_log()[-3000:]
    os.kill(ranks[1]["pid"], signal.SIGKILL)

    job = succeeded(platform, job["id"])
    events = platform.events(job["id"])
    lost = of_type(events, "job.rank_lost")
    assert len(lost) == 1 and lost[0]["attempt"] == 1, lost
    assert {(r["rank"], r["pid"], r["signal"]) for r in lost[0]["data"]["ranks"]} == {(1, ranks[1]["pid"], "SIGKILL")}
    assert job["attempt"] == 2 and of_type(events, "job.requeued")
    resumed = of_type(events, "job.resumed")
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2 and resumed[0]["data"]["step"] > 0
    # The second attempt ran on 2 ranks again; both attempts' processes are gone.
    assert [e["attempt"] for e in of_type(events, "distributed.started")] == [1, 2]
    for rank in ranks:
        with pytest.raises(ProcessLookupError):
            os.kill(rank["pid"], 0)
    assert job["result"]["metrics"]["accuracy"] > 0.85


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_ranks_of_a_killed_worker_stop_and_the_job_is_requeued(platform, sig):
    """SIGKILL: the ranks see their worker gone and exit; its lease runs out. SIGTERM (a pod being stopped): the worker
    stops its ranks, hands the attempt back at once and shuts down."""
    job = platform.submit(train_spec(TWO_RANKS, epochs=200))
    deadline = time.time() + 120
    while not of_type(platform.events(job["id"]), "train.epoch"):
        assert time.time() < deadline and platform.job(job["id"])["status"] in ("queued", "running")
        time.sleep(0.2)
    ranks = of_type(platform.events(job["id"]), "distributed.started")[0]["data"]["ranks"]
    platform.kill_worker(sig)
    gone = time.time() + 10
    while time.time() < gone and any(_alive(rank["pid"]) for rank in ranks):
        time.sleep(0.1)
    assert not any(_alive(rank["pid"]) for rank in ranks), "a rank outlived its worker"
    platform.start_worker()
    deadline = time.time() + 60  # the lease runs out, the reaper requeues, the fresh worker claims attempt 2
    while platform.job(job["id"])["attempt"] < 2:
        assert time.time() < deadline, platform.job(job["id"])
        time.sleep(0.2)
    assert platform.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    assert platform.wait(job["id"], timeout=60)["status"] == "cancelled"
    handed_back = of_type(platform.events(job["id"]), "job.rank_lost")
    assert len(handed_back) == (1 if sig == signal.SIGTERM else 0), handed_back


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_more_devices_than_the_worker_has_fail_with_a_code():
    with pytest.raises(JobFailure) as gpus:
        distributed.require_devices(Resources(accelerator="gpu", devices=torch.cuda.device_count() + 1))
    assert gpus.value.code == "devices_unavailable" and "GPUs" in gpus.value.message
    with pytest.raises(JobFailure) as cores:
        distributed.require_devices(Resources(devices=len(os.sched_getaffinity(0)) + 1))
    assert cores.value.code == "devices_unavailable"
    distributed.require_devices(Resources(devices=2))  # what this 2-core machine gives
    distributed.require_devices(Resources(devices=2, nodes=2))  # devices count per node


def test_the_loop_is_local_without_a_process_group():
    assert distributed.world() == 1 and distributed.is_main() and distributed.device() is None
    index = torch.arange(10)
    assert list(distributed.rank_slices([index]))[0] is index
    distributed.training_done()  # nothing to leave in a 1-process job


class NodeWorkers:
    """Worker processes of the session platform that serve only the 2-node class cpu-n2: each is one node, and the
    rendezvous is on 127.0.0.1 (REFINERY_WORKER_ADDRESS)."""

    def __init__(self, platform):
        from core.embedded import worker_args
        from core.resources import class_queues
        self.platform, self.procs = platform, {}
        self.env = dict(platform.env, REFINERY_WORKER_CLASSES="cpu-n2", REFINERY_WORKER_ADDRESS="127.0.0.1",
                        REFINERY_NODES_JOIN_SECONDS="15")
        self.args = worker_args(",".join(class_queues(self.env["REFINERY_QUEUE"], "cpu-n2")))

    def start(self, name: str) -> None:
        path = self.platform.home / f"{name}.log"
        path.unlink(missing_ok=True)
        self.procs[name] = subprocess.Popen([sys.executable, *self.args], env=self.env, cwd=ROOT,
                                            stdout=path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while " ready." not in path.read_text(errors="replace"):
            assert time.time() < deadline and self.procs[name].poll() is None, self.log(name)
            time.sleep(0.2)

    def log(self, name: str) -> str:
        return (self.platform.home / f"{name}.log").read_text(errors="replace")[-3000:]

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)}" for name in self.procs)

    def name_of(self, worker: str) -> str:
        """The name of the process whose worker id (host:pid) is `worker`."""
        return next(name for name, proc in self.procs.items() if worker.endswith(f":{proc.pid}"))

    def stop(self, *names: str) -> None:
        for name in names or list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture(scope="module")
def node_workers(platform):
    workers = NodeWorkers(platform)
    try:
        workers.start("node-a")
        workers.start("node-b")
        yield workers
    finally:
        workers.stop()


def test_a_two_node_train_job_matches_one_process(platform, one_and_two, node_workers):
    job = platform.submit(train_spec(TWO_NODES))
    assert job["resource_class"] == "cpu-n2"
    job = platform.wait(job["id"], timeout=120)
    assert job["status"] == "succeeded", (job.get("error"), node_workers.logs())
    difference = matches_one_process(platform, one_and_two[0], job)
    print(f"2 nodes vs 1 process: max weight difference {difference:.2e}")
    started = of_type(platform.events(job["id"]), "distributed.started")
    assert len(started) == 1, started
    data = started[0]["data"]
    assert data["world_size"] == 2 and data["nodes"] == 2 and data["backend"] == "gloo"
    ranks = data["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and len({r["pid"] for r in ranks}) == 2
    # One rank in each of the two node workers; one attempt, counted in the 1-process job's global steps.
    assert {node_workers.name_of(r["worker"]) for r in ranks} == {"node-a", "node-b"}
    assert job["attempt"] == 1 and job["progress"]["step"] == one_and_two[0]["progress"]["step"]


def test_a_killed_node_requeues_the_attempt_and_the_next_resumes(platform, node_workers):
    job = platform.submit(train_spec(TWO_NODES, epochs=40))
    deadline, ranks = time.time() + 90, None
    while time.time() < deadline:  # the follower node, once a checkpoint exists to resume from
        events = platform.events(job["id"])
        started = of_type(events, "distributed.started")
        if started and of_type(events, "checkpoint.saved"):
            ranks = started[0]["data"]["ranks"]
            break
        assert platform.job(job["id"])["status"] in ("queued", "running"), node_workers.logs()
        time.sleep(0.2)
    assert ranks is not None, node_workers.logs()
    follower = node_workers.name_of(ranks[1]["worker"])
    node_workers.procs[follower].kill()  # the whole follower worker, as a machine going away
    node_workers.procs[follower].wait(10)
    node_workers.start(follower)  # a fresh node for the next attempt

    job = platform.wait(job["id"], timeout=120)
    assert job["status"] == "succeeded", (job.get("error"), node_workers.logs())
    events = platform.events(job["id"])
    lost = of_type(events, "job.rank_lost")
    assert len(lost) == 1 and lost[0]["attempt"] == 1, lost
    assert [(r["rank"], r["pid"], r["signal"]) for r in lost[0]["data"]["ranks"]] == [(1, ranks[1]["pid"], "lost")]
    assert job["attempt"] == 2 and of_type(events, "job.requeued")
    resumed = of_type(events, "job.resumed")
    assert len(resumed) == 1 and resumed[0]["attempt"] == 2 and resumed[0]["data"]["step"] > 0
    again = of_type(events, "distributed.started")
    assert [e["attempt"] for e in again] == [1, 2] and again[1]["data"]["nodes"] == 2
    assert not _alive(ranks[1]["pid"])
    assert job["result"]["metrics"]["accuracy"] > 0.85


def test_a_node_that_does_not_join_hands_the_attempt_back_and_the_job_runs_once_one_does(platform, node_workers):
    """One cpu-n2 worker alone: its rendezvous waits REFINERY_NODES_JOIN_SECONDS (15 s here) for the second node,
    then the attempt is handed back (no hang, no lost job); once a second worker serves the class, the job runs."""
    node_workers.stop("node-b")
    job = platform.submit(train_spec(TWO_NODES))
    deadline = time.time() + 60
    while not of_type(platform.events(job["id"]), "job.nodes_missing"):
        assert time.time() < deadline and platform.job(job["id"])["status"] in ("queued", "running"), \
            node_workers.logs()
        time.sleep(0.3)
    missing = of_type(platform.events(job["id"]), "job.nodes_missing")[0]
    assert missing["attempt"] == 1 and missing["data"] == {"joined": 1, "nodes": 2}, missing
    node_workers.start("node-b")
    job = platform.wait(job["id"], timeout=90)
    assert job["status"] == "succeeded", (job.get("error"), node_workers.logs())
    events = platform.events(job["id"])
    assert job["attempt"] >= 2 and of_type(events, "job.requeued")
    assert of_type(events, "distributed.started")[-1]["data"]["nodes"] == 2
