"""Training step time and memory at FeTS-like sizes, with and without automatic mixed precision (AMP).

The sites' training step (``fedseg.trainer``: FedSegUNet, Dice+Focal loss, Adam, autocast + GradScaler,
which the trainer turns on by itself on CUDA) on random 4-channel crops, for each crop size, in one
process. Baseline: the same step in full precision (fp32) in the same run. Made for a GPU (the default
128^3 crops); ``--device cpu`` with small crops checks the script anywhere (AMP on CPU is bfloat16).

    .venv/bin/python -m bench.gpu_step [--profile fets2022] [--crops 96 128] [--batch 2] [--channels ...] [--device cuda]

The network width and the crops per step default to the profile's (``fedseg.settings``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import table, write_result
from fedseg.network import FedSegUNet
from fedseg.settings import PROFILES
from fedseg.trainer import build_loss


def measure(crop: int, batch: int, channels: list[int], device: torch.device, amp: bool, steps: int) -> dict:
    torch.manual_seed(0)
    model = FedSegUNet(channels=channels).to(device)
    loss_fn = build_loss("dice_focal")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")
    image = torch.randn(batch, 4, crop, crop, crop, device=device)
    label = (torch.rand(batch, 3, crop, crop, crop, device=device) > 0.9).float()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for step in range(steps + 2):  # two warm-up steps (cuDNN autotuning, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = loss_fn(model(image), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "crop": crop,
        "batch": batch,
        "amp": amp,
        "seconds_per_step": statistics.median(seconds),
        "voxels_per_second": batch * crop**3 / statistics.median(seconds),
        "peak_gpu_mib": peak,
        "loss_finite": bool(torch.isfinite(loss).item()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="fets2022")
    parser.add_argument("--crops", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--batch", type=int, default=None, help="crops per step (default: the profile's)")
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default: the profile's")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default=None, help="default: cuda; without a GPU nothing is measured")
    args = parser.parse_args()
    chosen = PROFILES[args.profile]
    args.batch = args.batch or chosen.batch_size * chosen.samples_per_case
    args.channels = args.channels or list(chosen.channels)
    if args.device is None:
        if not torch.cuda.is_available():
            print("bench.gpu_step: no GPU here, nothing measured (check the script with --device cpu --crops 32)")
            return
        args.device = "cuda"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for crop in args.crops:
        full = measure(crop, args.batch, args.channels, device, amp=False, steps=args.steps)
        mixed = measure(crop, args.batch, args.channels, device, amp=True, steps=args.steps)
        mixed["speedup_vs_fp32"] = full["seconds_per_step"] / mixed["seconds_per_step"]
        if full["peak_gpu_mib"]:
            mixed["memory_vs_fp32"] = mixed["peak_gpu_mib"] / full["peak_gpu_mib"]
        rows += [full, mixed]
    name = "gpu_step" if device.type == "cuda" else "gpu_step_cpu_check"
    path = write_result(name, {"device": str(device), "profile": args.profile, "channels": args.channels, "rows": rows})
    print(
        table(
            ["crop", "batch", "AMP", "s/step", "Mvoxel/s", "peak GPU MiB", "speed vs fp32", "memory vs fp32"],
            [
                [
                    f"{r['crop']}^3",
                    r["batch"],
                    r["amp"],
                    f"{r['seconds_per_step']:.3f}",
                    f"{r['voxels_per_second'] / 1e6:.1f}",
                    "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}",
                    f"{r.get('speedup_vs_fp32', 1.0):.2f}",
                    f"{r.get('memory_vs_fp32', 1.0):.2f}",
                ]
                for r in rows
            ],
        )
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
