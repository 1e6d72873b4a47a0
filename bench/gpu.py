"""P1 and P2 on a CUDA device (issue 12): the platform's `train` job on REFINERY_DEVICE=cuda against a raw loop using
the tricks a GPU engineer would write — the whole dataset resident on the device, AMP in bfloat16, channels_last for
the convnet, fused AdamW, optionally torch.compile — and a `kd` epoch with cached teacher logits against its
from-scratch twin on the same device. Without CUDA it says so and exits 0 (CI never has a GPU).

    .venv/bin/python -m bench.gpu [--quick] [--compile] [--results DIR]

Writes bench/results/gpu_summary.json and gpu_summary.md.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import RESULTS, served
from bench.figures_jobs import DIGITS_TRAIN_ROWS, p2_kd_epoch
from bench.suite import SIZES, Size, interleaved, machine, markdown, row, write
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the raw loop's model")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False); skipped, nothing written.")
        return 0
    size = SIZES["quick" if args.quick else "full"]
    started, machine_info = time.time(), machine()
    with served({"REFINERY_DEVICE": "cuda"}) as platform:
        rows = p1_gpu(size, platform, args.compile) + p2_kd_epoch(size, platform)
    summary = write(args.results, size, rows, machine_info, started, name="gpu_summary",
                    command="python -m bench.gpu" + (" --compile" if args.compile else ""))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
