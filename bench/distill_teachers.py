"""Several teachers (issue 3): `multi_teacher` with a CNN and an MLP teacher — plain averaging and MTARD's balancing
— against `kd` from each teacher alone; and `ensemble`: four CNNs (different seeds) distilled into one student 8x
smaller than a member (and one 8x smaller than the whole ensemble), reporting the share of the ensemble's gain over a single member the student keeps (the paper
"Pre-training under infinite compute" reports 83% at 8x smaller). Held-out accuracy of model.onnx files in ONNX
Runtime; the ensemble's own accuracy averages its members' ONNX softmaxes.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.distill_teachers [--quick]

Prints tables and writes bench/results/distill_teachers.json."""
import platform

import numpy as np

from bench.distill_common import (  # noqa: E402
    SMALL_STUDENT,
    TEACHER_EPOCHS,
    accuracy,
    bench_platform,
    mean_std,
    onnx_logits,
    print_table,
    save,
    scope,
)

MEMBERS = 4


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def multi_teacher(bench, held_out, data: str, cnn: dict, mlp: dict, seeds: list[int]) -> list[dict]:
    teachers = [{"uri": f"job://{cnn['id']}"}, {"uri": f"job://{mlp['id']}"}]
    variants = {
        "kd from the CNN": {"algorithm": "kd", "model": teachers[0]},
        "kd from the MLP": {"algorithm": "kd", "model": teachers[1]},
        "multi_teacher, plain average": {"algorithm": "multi_teacher", "teachers": teachers,
                                         "params": {"entropy_balance": False, "loss_balance": False}},
        "multi_teacher, MTARD balance": {"algorithm": "multi_teacher", "teachers": teachers,
                                         "params": {"entropy_balance": True, "loss_balance": True}},
    }
    specs = [{"method": "distill", "student": SMALL_STUDENT, "dataset": bench.dataset(data), "seed": seed,
              **variant} for variant in variants.values() for seed in seeds]
    jobs = iter(bench.run_all(specs))
    rows = []
    for name in variants:
        runs = [next(jobs) for _ in seeds]
        scores = [accuracy(bench.artifact(job, "model.onnx"), *held_out) for job in runs]
        row = {"data": data, "student from": name, "held_out": mean_std(scores)}
        section = bench.report(runs[0])["distillation"]
        if "teacher_temperatures" in section:
            row["temperatures"] = section["teacher_temperatures"]
            row["final_loss_weights"] = section["teacher_loss_weights"]
        rows.append(row)
    teacher_rows = [{"data": data, "student from": f"(the {name} teacher itself)",
                     "held_out": mean_std([accuracy(bench.artifact(teacher, "model.onnx"), *held_out)])}
                    for name, teacher in (("CNN", cnn), ("MLP", mlp))]
    return teacher_rows + rows


def ensembles(bench, held_out, data: str, members: list[dict], seeds: list[int]) -> list[dict]:
    """Students 8x smaller than one member, and 8x smaller than the whole ensemble."""
    return [ensemble(bench, held_out, data, members, seeds, ratio) for ratio in (1 / 8, MEMBERS / 8)]


def ensemble(bench, held_out, data: str, members: list[dict], seeds: list[int], ratio: float) -> dict:
    x, y = held_out
    member_probabilities = [softmax(onnx_logits(bench.artifact(m, "model.onnx"), x)) for m in members]
    single = [float((p.argmax(1) == y).mean()) for p in member_probabilities]
    ensemble_accuracy = float((np.mean(member_probabilities, 0).argmax(1) == y).mean())
    jobs = bench.run_all([{"method": "distill", "algorithm": "ensemble", "student": {"params_ratio": ratio},
                           "teachers": [{"uri": f"job://{m['id']}"} for m in members], "dataset": bench.dataset(data),
                           "params": {"baseline": True}, "seed": seed} for seed in seeds])
    student = [accuracy(bench.artifact(job, "model.onnx"), *held_out) for job in jobs]
    scratch = [accuracy(bench.artifact(job, "baseline.onnx"), *held_out) for job in jobs]
    section = bench.report(jobs[0])["distillation"]
    single_mean, student_mean = float(np.mean(single)), float(np.mean(student))
    gain = ensemble_accuracy - single_mean
    return {"data": data, "members": len(members), "single_member": mean_std(single),
            "ensemble": round(ensemble_accuracy, 4), "student": mean_std(student), "scratch": mean_std(scratch),
            "student_params": section["student"]["params"],
            "member_over_student": round(1 / section["student"]["params_ratio"], 2),
            "ensemble_over_student": section["ensemble_params_over_student"],
            "gain_kept": round((student_mean - single_mean) / gain, 3) if gain > 0 else None,
            "paper": "83% kept, student 8x smaller (Pre-training under infinite compute)"}


def main() -> None:
    quick, seeds, datasets = scope()
    results = {"machine": platform.platform(), "seeds": seeds, "multi_teacher": [], "ensemble": []}
    with bench_platform() as (bench, held_out):
        for data in datasets:
            epochs = TEACHER_EPOCHS[data]
            trained = bench.run_all(
                [{"method": "train", "dataset": bench.dataset(data), "params": {"epochs": epochs}, "seed": seed}
                 for seed in range(MEMBERS)]
                + [{"method": "train", "model": {"arch": "mlp"}, "dataset": bench.dataset(data),
                    "params": {"epochs": epochs}, "seed": 0}])
            members, mlp = trained[:MEMBERS], trained[MEMBERS]
            results["multi_teacher"] += multi_teacher(bench, held_out[data], data, members[0], mlp, seeds)
            results["ensemble"] += ensembles(bench, held_out[data], data, members, seeds)
    print_table("multi_teacher vs kd from each teacher alone (held-out accuracy)", results["multi_teacher"])
    print_table("ensemble of 4 CNNs into one student 8x smaller than a member, and 8x smaller than the ensemble",
                results["ensemble"])
    save("distill_teachers", results)


if __name__ == "__main__":
    main()
