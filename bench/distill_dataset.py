"""Dataset distillation benchmark (issue 3): distribution matching at 1 and 10 images per class on digits and
mnist5k — fresh models on the distilled set and on its starting rows vs. on random real subsets of the same size vs. on
all the data, judged by several yardsticks (small CNN, default CNN, MLP) — the issue's independent check (a `train` job on
synthetic.npz vs. on a random real subset, scored on held-out rows in ONNX Runtime), and trajectory matching with
each AST improvement switched off in turn.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.distill_dataset [--quick]

Prints tables and writes bench/results/distill_dataset.json."""
import argparse
import platform

import numpy as np

from bench.distill_common import accuracy, bench_platform, print_table, save

YARDSTICKS = {"small cnn (default)": None, "default cnn (65k)": {"arch": "cnn", "args": {}},
              "mlp": {"arch": "mlp", "args": {"hidden": [64]}}}
AST_SWITCHES = ["clip_loss", "gradient_penalty", "balanced_inner_loss", "intermediate_matching",
                "weight_perturbation"]


def dataset_spec(bench, data: str, params: dict, student: dict | None = None) -> dict:
    spec = {"method": "distill", "algorithm": "dataset", "dataset": bench.dataset(data),
            "params": {"eval_repeats": 5, **params}, "seed": 0}
    return {**spec, "student": student} if student else spec


def row(data: str, name: str, job: dict) -> dict:
    """Fresh-model validation accuracy of the distilled set and of its starting rows (the job publishes the
    better), of random real rows of the same size, and of all the data."""
    m = job["result"]["metrics"]
    return {"data": data, "variant": name, "distilled": m["distilled_accuracy"], "initial": m["initial_accuracy"],
            "kept": m["kept"], "random_real": m["random_real_accuracy"], "full": m["full_data_accuracy"],
            "distilled_gain": round(m["distilled_accuracy"] - m["random_real_accuracy"], 4),
            "rows_x": m["rows_compression"], "seconds": round(job["finished_at"] - job["started_at"], 1)}


def distribution_matching(bench, data: str, ipcs: list[int], yardsticks: dict) -> tuple[list[dict], dict]:
    """Rows per (ipc, yardstick); also returns the default ipc-10 job."""
    cases = [(ipc, name, student) for ipc in ipcs for name, student in yardsticks.items()]
    jobs = bench.run_all([dataset_spec(bench, data, {"ipc": ipc}, student) for ipc, _, student in cases])
    rows = [{"ipc": ipc, **row(data, f"DM, {name}", job)} for (ipc, name, _), job in zip(cases, jobs, strict=True)]
    default_ipc10 = next(job for (ipc, name, _), job in zip(cases, jobs, strict=True)
                         if ipc == 10 and name == "small cnn (default)")
    return rows, default_ipc10


def independent_check(bench, held_out, data: str, ipc: int, job: dict) -> dict:
    """What the issue's reviewer does: a default `train` job on synthetic.npz, another on a random real subset of
    the same size, both validated on 300 real rows outside the subsets, scored on the held-out rows."""
    train = np.load(bench.root / f"{data}_train.npz")
    order = np.random.default_rng(7).permutation(len(train["y"]))
    validation, pool = order[:300], order[300:]
    np.savez(bench.root / f"{data}_valslice.npz", x=train["x"][validation], y=train["y"][validation])
    rng = np.random.default_rng(0)
    subset = np.concatenate([rng.choice(pool[train["y"][pool] == label], ipc, replace=False) for label in range(10)])
    np.savez(bench.root / f"{data}_random{ipc}.npz", x=train["x"][subset], y=train["y"][subset])
    validation_ref = {"uri": f"file://{bench.root}/{data}_valslice.npz"}
    synthetic, random_real = bench.run_all([
        {"method": "train", "dataset": {"uri": f"job://{job['id']}/synthetic.npz", "validation": validation_ref},
         "params": {"epochs": 100}, "seed": 0},
        {"method": "train", "dataset": {"uri": f"file://{bench.root}/{data}_random{ipc}.npz",
                                        "validation": validation_ref}, "params": {"epochs": 100}, "seed": 0}])
    return {"data": data, "ipc": ipc, "train job on synthetic.npz": accuracy(bench.artifact(synthetic, "model.onnx"),
                                                                              *held_out),
            "train job on random real": accuracy(bench.artifact(random_real, "model.onnx"), *held_out)}


def trajectory_matching(bench, data: str, quick: bool) -> list[dict]:
    base = {"ipc": 1, "matching": "trajectory", "iterations": 100 if quick else 200}
    cases = {"TM + all AST improvements": {}}
    if not quick:
        cases.update({f"TM without {switch}": {switch: False} for switch in AST_SWITCHES})
        cases["TM, real init instead of representative"] = {"init": "real"}
        cases["plain MTT (all off, real init)"] = {**{s: False for s in AST_SWITCHES}, "init": "real"}
    specs = [dataset_spec(bench, data, {**base, **params}) for params in cases.values()]
    if not quick and data == "digits":
        cases["TM + all AST, ipc 10"] = {}
        specs.append(dataset_spec(bench, data, {**base, "ipc": 10}))
    jobs = bench.run_all(specs)
    return [row(data, name, job) for name, job in zip(cases, jobs, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="digits only, the default yardstick, fewer TM runs")
    args = parser.parse_args()
    datasets = ["digits"] if args.quick else ["digits", "mnist5k"]
    results = {"machine": platform.platform(), "distribution_matching": [], "independent_check": [],
               "trajectory_matching": []}
    with bench_platform() as (bench, held_out):
        for data in datasets:
            yardsticks = {"small cnn (default)": None} if args.quick else (
                YARDSTICKS if data == "digits" else {k: YARDSTICKS[k] for k in ("small cnn (default)", "mlp")})
            rows, ipc10 = distribution_matching(bench, data, [1, 10], yardsticks)
            results["distribution_matching"] += rows
            results["independent_check"].append(independent_check(bench, held_out[data], data, 10, ipc10))
            results["trajectory_matching"] += trajectory_matching(bench, data, args.quick)
    print_table("Distribution matching: fresh-model validation accuracy on the synthetic set vs random real rows "
                "of the same size vs all data", results["distribution_matching"])
    print_table("The issue's check: a default train job on synthetic.npz vs on random real rows (held out, ONNX)",
                results["independent_check"])
    print_table("Trajectory matching at 1 image per class, AST improvements switched off one at a time",
                results["trajectory_matching"])
    save("distill_dataset", results)


if __name__ == "__main__":
    main()
