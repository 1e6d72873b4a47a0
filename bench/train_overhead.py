"""Platform overhead on a `train` job, as ratios against a hand-written PyTorch loop run in the same script:
the same CNN, optimiser, schedule, batch size and epochs on digits, one thread.

    .venv/bin/python bench/train_overhead.py [--epochs 30] [--repeats 3]
"""
import argparse
import json
import statistics
import time

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from bench.common import RESULTS, embedded_platform, wait_job
from workers.models import build_model


def digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """digits as (x_train, y_train, x_val, y_val) tensors, the 10 % stratified validation split the job makes."""
    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)
    x_tr, x_va, y_tr, y_va = train_test_split(x, digits.target, test_size=0.1, stratify=digits.target, random_state=seed)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(), torch.from_numpy(x_va), torch.from_numpy(y_va).long()


def digits_cnn(x_train: torch.Tensor) -> torch.nn.Module:
    """The train job's default CNN for digits, normalised by the training split's statistics."""
    return build_model("cnn", {}, (1, 8, 8), 10, x_train.mean().numpy(), x_train.std().numpy())


def hand_written_loop(epochs: int, seed: int) -> tuple[float, float]:
    """The baseline: what an engineer would write by hand. Returns (seconds, validation accuracy)."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_va, y_va = digits_split(seed)
    model = digits_cnn(x_tr)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_tr))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_va).argmax(1) == y_va).float().mean().item()
    return time.perf_counter() - start, accuracy


def platform_job(base: str, headers: dict, epochs: int, seed: int) -> dict:
    spec = {"method": "train", "dataset": {"uri": "builtin://digits", "validation": {"fraction": 0.1}},
            "params": {"epochs": epochs, "batch_size": 64}, "budget": {"max_seconds": 600}, "seed": seed}
    submitted = time.time()
    job = httpx.post(f"{base}/v1/jobs", json=spec, headers=headers).json()
    job = wait_job(base, headers, job["id"])
    seen = time.time()
    events = httpx.get(f"{base}/v1/jobs/{job['id']}/events", headers=headers, params={"limit": 100}).json()["data"]
    while True:
        more = httpx.get(f"{base}/v1/jobs/{job['id']}/events", headers=headers,
                         params={"limit": 100, "after": events[-1]["id"]}).json()
        events += more["data"]
        if not more["has_more"]:
            break
    at = {e["type"]: e["created_at"] for e in events}
    return {"training_seconds": at["train.finished"] - at["model.built"],
            "job_seconds": job["finished_at"] - job["started_at"],
            "submit_to_done_seconds": seen - submitted,
            "queue_seconds": job["started_at"] - job["created_at"],
            "accuracy": job["result"]["metrics"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with embedded_platform() as (base, headers):
        platform_job(base, headers, 1, 99)  # warm the worker (imports, first ONNX export)
        for seed in range(args.repeats):
            hand_seconds, hand_acc = hand_written_loop(args.epochs, seed)
            job = platform_job(base, headers, args.epochs, seed)
            rows.append({"seed": seed, "hand_seconds": hand_seconds, "hand_accuracy": hand_acc, **job})
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "seed"}
    summary = {"epochs": args.epochs, "repeats": args.repeats, "rows": rows, "median": median,
               "ratio_training_vs_hand_loop": median["training_seconds"] / median["hand_seconds"],
               "ratio_job_vs_hand_loop": median["job_seconds"] / median["hand_seconds"],
               "ratio_submit_to_done_vs_hand_loop": median["submit_to_done_seconds"] / median["hand_seconds"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_overhead.json").write_text(json.dumps(summary, indent=2))
    print(f"digits, cnn, {args.epochs} epochs, median of {args.repeats}:")
    print(f"  hand-written loop      {median['hand_seconds']:.2f} s  (val acc {median['hand_accuracy']:.4f})")
    print(f"  platform training      {median['training_seconds']:.2f} s  ratio {summary['ratio_training_vs_hand_loop']:.2f}")
    print(f"  platform whole job     {median['job_seconds']:.2f} s  ratio {summary['ratio_job_vs_hand_loop']:.2f}"
          "  (data, export, ONNX check, measurement, report)")
    print(f"  submit -> succeeded    {median['submit_to_done_seconds']:.2f} s  ratio "
          f"{summary['ratio_submit_to_done_vs_hand_loop']:.2f}; queue wait {median['queue_seconds']:.3f} s")


if __name__ == "__main__":
    main()
