"""P1 and P2 on a CUDA device (issue 12): the platform's `train` job on REFINERY_DEVICE=cuda against a raw loop using
the tricks a GPU engineer would write — the whole dataset resident on the device, AMP in bfloat16, channels_last for
the convnet, fused AdamW, optionally torch.compile — and a `kd` epoch with cached teacher logits against its
from-scratch twin on the same device. Plus the NCCL path (issue 13): the same `train` job with resources
{"accelerator": "gpu", "devices": 2} (DistributedDataParallel over 2 GPUs, workers/distributed.py) against it on one
GPU, same global batch and seed: throughput, and how close the two models' validation accuracy and final train loss
are. Without CUDA it says so and exits 0 (CI never has a GPU); with one GPU the NCCL row says why it was skipped.

    .venv/bin/python -m bench.gpu [--quick] [--compile] [--ddp-only] [--results DIR]

Writes bench/results/gpu_summary.json and gpu_summary.md.
"""
import argparse
import sys
import time
from pathlib import Path

import httpx
import torch
import torch.nn.functional as F

from bench.common import RESULTS, job_events, served, wait_job
from bench.figures_jobs import DIGITS_TRAIN_ROWS, p2_kd_epoch
from bench.suite import SIZES, Size, interleaved, machine, markdown, row, skipped, write
from bench.train_overhead import digits_cnn, digits_split, platform_job


def raw_cuda_loop(epochs: int, seed: int, compile_model: bool) -> float:
    """Seconds of `epochs` epochs of the digits CNN, batch 64, AdamW + cosine, as the P1 hand loop but tuned."""
    torch.manual_seed(seed)
    device = torch.device("cuda")
    x_tr, y_tr, x_va, y_va = digits_split(seed)
    x_tr = x_tr.to(device).contiguous(memory_format=torch.channels_last)
    y_tr, x_va, y_va = y_tr.to(device), x_va.to(device).contiguous(memory_format=torch.channels_last), y_va.to(device)
    model = digits_cnn(x_tr.cpu()).to(device).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_tr), device=device)
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(step_model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            (step_model(x_va).argmax(1) == y_va).float().mean()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def p1_gpu(size: Size, platform, compile_model: bool) -> list:
    platform_job(platform.base, platform.headers, 1, 99)  # CUDA context, kernels, first export
    raw_cuda_loop(1, 99, compile_model)  # the same warm-up for the raw side (and compilation)
    jobs = []

    def ours(rep: int) -> float:
        jobs.append(platform_job(platform.base, platform.headers, size.train_epochs, rep))
        return jobs[-1]["training_seconds"]

    training, raw = interleaved(size.repeats, ours, lambda rep: raw_cuda_loop(size.train_epochs, rep, compile_model))
    samples = size.train_epochs * DIGITS_TRAIN_ROWS
    tricks = "device-resident data, AMP bf16, channels_last, fused AdamW" + (", torch.compile" if compile_model else "")
    return [row("P1", "train job on CUDA, training phase", "samples/s", "≥ 0.97×", [samples / s for s in training],
                [samples / s for s in raw], "raw CUDA loop", note=f"raw loop: {tricks}"),
            row("P1", "train job on CUDA, whole job wall time", "s", "≤ 1.10×", [j["job_seconds"] for j in jobs], raw,
                "raw CUDA loop")]


DDP_DEVICES = 2
# The platform worker serves the 1-GPU and the 2-GPU class next to the default one (P1's jobs name no resources).
WORKER_CLASSES = f"cpu,gpu,gpu-x{DDP_DEVICES}"


def gpu_train_job(platform, devices: int, epochs: int, seed: int, accelerator: str = "gpu") -> dict:
    """A digits `train` job on `devices` GPUs (batch 64 in all: 32 per rank on 2); its training phase in seconds
    (model.built → train.finished), accuracy, last epoch's train loss and, on several ranks, the backend."""
    spec = {"method": "train", "dataset": {"uri": "builtin://digits", "validation": {"fraction": 0.1}},
            "params": {"epochs": epochs, "batch_size": 64},
            "resources": {"accelerator": accelerator, "devices": devices},
            "budget": {"max_seconds": 600}, "seed": seed}
    with httpx.Client(base_url=platform.base, headers=platform.headers, timeout=60) as http:
        job = wait_job(platform.base, platform.headers, http.post("/v1/jobs", json=spec).json()["id"])
        if job["status"] != "succeeded":
            raise RuntimeError(f"the {devices}-GPU train job {job['id']} ended {job['status']}: {job.get('error')}")
        events = job_events(http, job["id"])
        losses = http.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "train_loss"}).json()["data"]
    at = {e["type"]: e for e in events}
    return {"training_seconds": at["train.finished"]["created_at"] - at["model.built"]["created_at"],
            "accuracy": job["result"]["metrics"]["accuracy"], "train_loss": losses[0]["points"][-1]["value"],
            "backend": at.get("distributed.started", {}).get("data", {}).get("backend")}


def p1_ddp(size: Size, platform) -> list:
    figure = f"train job on {DDP_DEVICES} GPUs (NCCL DDP), training phase"
    if torch.cuda.device_count() < DDP_DEVICES:
        why = f"needs {DDP_DEVICES} GPUs; this machine has {torch.cuda.device_count()}"
        print(f"bench/gpu.py: NCCL path skipped: {why}.")
        return [skipped("P1", figure, why)]
    gpu_train_job(platform, DDP_DEVICES, 1, 99)  # the forkserver, CUDA contexts and NCCL communicators, once
    jobs: dict[int, list[dict]] = {1: [], DDP_DEVICES: []}

    def on(devices: int):
        def one(rep: int) -> float:
            jobs[devices].append(gpu_train_job(platform, devices, size.train_epochs, rep))
            return jobs[devices][-1]["training_seconds"]
        return one

    several, single = interleaved(size.repeats, on(DDP_DEVICES), on(1))
    if any(job["backend"] != "nccl" for job in jobs[DDP_DEVICES]):
        raise RuntimeError(f"a {DDP_DEVICES}-GPU job did not run on NCCL: {jobs[DDP_DEVICES]}")
    samples = size.train_epochs * DIGITS_TRAIN_ROWS
    gaps = [abs(a["accuracy"] - b["accuracy"]) for a, b in zip(jobs[DDP_DEVICES], jobs[1], strict=True)]
    loss_gaps = [abs(a["train_loss"] - b["train_loss"]) / b["train_loss"]
                 for a, b in zip(jobs[DDP_DEVICES], jobs[1], strict=True)]
    return [row("P1", figure, "samples/s", "≥ 1×", [samples / s for s in several], [samples / s for s in single],
                "the same job on 1 GPU",
                note=f"same global batch and seeds; validation accuracy differs by at most {max(gaps):.4f}, the last "
                     f"epoch's train loss by at most {max(loss_gaps):.2%} (dropout masks differ between the runs)")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the raw loop's model")
    parser.add_argument("--ddp-only", action="store_true", help="only the NCCL path (train on 2 GPUs vs 1)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); skipped, nothing written.")
        return 0
    size = SIZES["quick" if args.quick else "full"]
    started, machine_info = time.time(), machine()
    with served({"REFINERY_DEVICE": "cuda", "REFINERY_WORKER_CLASSES": WORKER_CLASSES}) as platform:
        rows = [] if args.ddp_only else p1_gpu(size, platform, args.compile) + p2_kd_epoch(size, platform)
        rows += p1_ddp(size, platform)
    summary = write(args.results, size, rows, machine_info, started, name="gpu_summary",
                    command="python -m bench.gpu" + (" --compile" if args.compile else "")
                    + (" --ddp-only" if args.ddp_only else ""))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
