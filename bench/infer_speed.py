"""Inference time and peak memory for one full-size (240x240x155) FeTS case on this machine.

``fedseg infer`` runs in a fresh process (start-up, reading, sliding-window inference with the demo's
network and 48^3 windows, writing the segmentation and the overlay). Baseline in the same run: a fresh
process that imports the same libraries and only reads the four modalities.

    .venv/bin/python -m bench.infer_speed
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch

from bench.common import run_measured, table, write_result

BASELINE = """
import sys, os, nibabel as nib, numpy as np, torch, monai
case = sys.argv[1]
sid = os.path.basename(case)
for m in ("t1", "t1ce", "t2", "flair"):
    np.asarray(nib.load(os.path.join(case, f"{sid}_{m}.nii.gz")).dataobj)
"""


def parse_args() -> argparse.Namespace:
    """No options: ``--help`` says what is measured instead of running the measurement."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.parse_args()


def full_size_case(work: str) -> tuple[str, str]:
    """One synthetic full-size case and an untrained model of the demo's network: (case folder, model file)."""
    from fedseg.data_prep.synthetic import Institution, SyntheticConfig, generate
    from fedseg.network import FedSegUNet

    source = generate(
        os.path.join(work, "data"), SyntheticConfig(shape=(240, 240, 155), institutions=[Institution(subjects=1)])
    )
    model = os.path.join(work, "FL_global_model.pt")
    torch.save({"model": FedSegUNet().state_dict()}, model)
    return os.path.join(source, "FeTS2022_00001"), model


def measure_rows(work: str, case: str, model: str) -> list[dict]:
    """The baseline, then ``fedseg infer`` without and with the overlay, each in a fresh measured process."""
    base_wall, base_rss = run_measured([sys.executable, "-c", BASELINE, case])
    rows = [
        {
            "what": "baseline: start-up and reading the four volumes",
            "seconds": base_wall,
            "peak_rss_mib": base_rss,
            "vs_baseline": 1.0,
        }
    ]
    for label, extra in (
        ("fedseg infer", []),
        ("fedseg infer + overlay", ["--overlay", os.path.join(work, "o.png")]),
    ):
        wall, rss = run_measured(
            [
                sys.executable,
                "-m",
                "fedseg.app",
                "infer",
                case,
                "--model",
                model,
                "--roi",
                "48",
                "48",
                "48",
                "--out",
                os.path.join(work, "seg.nii.gz"),
                *extra,
            ]
        )
        rows.append({"what": label, "seconds": wall, "peak_rss_mib": rss, "vs_baseline": wall / base_wall})
    return rows


def main() -> None:
    parse_args()
    work = tempfile.mkdtemp(prefix="fedseg_infer_bench_")
    try:
        case, model = full_size_case(work)
        rows = measure_rows(work, case, model)
        path = write_result(
            "infer_speed",
            {
                "shape": [240, 240, 155],
                "roi": [48, 48, 48],
                "network_channels": [16, 32, 64, 128],
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
        )
        print(
            table(
                ["what", "seconds", "peak RSS (MiB)", "time vs baseline"],
                [
                    [r["what"], f"{r['seconds']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['vs_baseline']:.2f}"]
                    for r in rows
                ],
            )
        )
        print(f"written {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
