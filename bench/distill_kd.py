"""Knowledge distillation benchmark (issue 3): on digits and mnist5k, a default CNN teacher and two students — a
1.7k-parameter 2-conv CNN and `params_ratio` 0.05 of the teacher — distilled with `kd` next to their from-scratch
twins (`baseline: true`) over 3 seeds; the few-label scenario (10% labels + the rest as `transfer`); and what a
student epoch costs with cached teacher logits vs. a from-scratch epoch vs. a teacher relabelling every batch.
Accuracies are model.onnx / baseline.onnx in ONNX Runtime on held-out rows no job saw.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.distill_kd [--quick]

Prints tables and writes bench/results/distill_kd.json."""
import platform

from bench.distill_common import (
    SMALL_STUDENT,
    TEACHER_EPOCHS,
    accuracy,
    bench_platform,
    mean_std,
    print_table,
    save,
    scope,
)

STUDENTS = {"2-conv 1.7k": SMALL_STUDENT, "params_ratio 0.05": {"params_ratio": 0.05}}


def kd_spec(bench, data: str, teacher: dict, student: dict, seed: int, **params) -> dict:
    return {"method": "distill", "algorithm": "kd", "model": {"uri": f"job://{teacher['id']}"}, "student": student,
            "dataset": bench.dataset(data), "params": {"baseline": True, **params}, "seed": seed}


def students_vs_twins(bench, held_out, data: str, teacher: dict, seeds: list[int]) -> list[dict]:
    rows = []
    for name, student in STUDENTS.items():
        jobs = bench.run_all([kd_spec(bench, data, teacher, student, seed) for seed in seeds])
        kd = [accuracy(bench.artifact(job, "model.onnx"), *held_out) for job in jobs]
        scratch = [accuracy(bench.artifact(job, "baseline.onnx"), *held_out) for job in jobs]
        built = bench.report(jobs[0])["distillation"]["student"]
        rows.append({"data": data, "student": name, "params": built["params"],
                     "params_ratio": built["params_ratio"], "teacher": accuracy(bench.artifact(teacher, "model.onnx"),
                                                                                *held_out),
                     "kd": mean_std(kd), "scratch": mean_std(scratch),
                     "gain": round(sum(kd) / len(kd) - sum(scratch) / len(scratch), 4),
                     "kd_wins": sum(k >= s for k, s in zip(kd, scratch, strict=True))})
    return rows


def few_labels(bench, held_out, data: str, seeds: list[int]) -> dict:
    """Teacher on the labeled 10%; students on it with and without the unlabeled 90% as transfer data."""
    (teacher,) = bench.run_all([{"method": "train", "dataset": bench.dataset(data, "labeled10", 0.2),
                                 "params": {"epochs": 40}, "seed": 0}])
    base = {"student": SMALL_STUDENT, "dataset": bench.dataset(data, "labeled10", 0.2)}
    specs = [{"method": "distill", "model": {"uri": f"job://{teacher['id']}"}, **base,
              "params": {"baseline": True, "epochs": 60}, "seed": seed, **transfer}
             for seed in seeds
             for transfer in ({}, {"transfer": {"uri": f"file://{bench.root}/{data}_unlabeled.npz"}})]
    jobs = bench.run_all(specs)
    kd_only = [accuracy(bench.artifact(job, "model.onnx"), *held_out) for job in jobs[0::2]]
    with_transfer = [accuracy(bench.artifact(job, "model.onnx"), *held_out) for job in jobs[1::2]]
    scratch = [accuracy(bench.artifact(job, "baseline.onnx"), *held_out) for job in jobs[0::2]]
    return {"data": data, "teacher": accuracy(bench.artifact(teacher, "model.onnx"), *held_out),
            "scratch": mean_std(scratch), "kd": mean_std(kd_only), "kd+transfer": mean_std(with_transfer),
            "kd_gain": round(mean_std(kd_only)["mean"] - mean_std(scratch)["mean"], 4),
            "transfer_gain": round(mean_std(with_transfer)["mean"] - mean_std(scratch)["mean"], 4)}


def epoch_costs(bench, data: str, teacher: dict) -> dict:
    """Seconds per epoch of the student (soft + hard loss) and of its from-scratch twin, both in the same job, with
    the teacher's logits cached, and with augmented inputs (the teacher then runs on every batch)."""
    cached, live = bench.run_all([kd_spec(bench, data, teacher, SMALL_STUDENT, 0, epochs=20),
                                  kd_spec(bench, data, teacher, SMALL_STUDENT, 0, epochs=20, augment=True)])
    result = {}
    for name, job in (("cached", cached), ("teacher_every_batch", live)):
        section = bench.report(job)["distillation"]
        result[name] = {"student_epoch_s": section["seconds_per_epoch"]["student"],
                        "scratch_epoch_s": section["seconds_per_epoch"]["baseline"],
                        "ratio": section["student_epoch_over_baseline_epoch"]}
    return {"data": data, **result}


def main() -> None:
    quick, seeds, datasets = scope()
    results = {"machine": platform.platform(), "seeds": seeds, "students": [], "few_labels": [], "epoch_costs": []}
    with bench_platform() as (bench, held_out):
        for data in datasets:
            (teacher,) = bench.run_all([{"method": "train", "dataset": bench.dataset(data),
                                         "params": {"epochs": TEACHER_EPOCHS[data]}, "seed": 0}])
            results["epoch_costs"].append(epoch_costs(bench, data, teacher))
            results["students"] += students_vs_twins(bench, held_out[data], data, teacher, seeds)
            results["few_labels"].append(few_labels(bench, held_out[data], data, seeds))
    print_table("KD student vs the same student from scratch (held-out accuracy, mean±std over seeds)",
                results["students"])
    print_table("10% labels: from scratch vs KD vs KD + the other 90% as unlabeled transfer", results["few_labels"])
    print_table("Epoch cost (s): student with cached teacher logits vs from-scratch twin, and with the teacher "
                "run on every (augmented) batch", [{"data": r["data"], **{f"{k}.{m}": v for k in
                                                   ("cached", "teacher_every_batch") for m, v in r[k].items()}}
                                                   for r in results["epoch_costs"]])
    save("distill_kd", results)


if __name__ == "__main__":
    main()
