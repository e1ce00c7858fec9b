"""Data preparation speed and memory on full-size (240x240x155) synthetic FeTS2022 subjects.

Baseline in the same run: decoding the five volumes of every subject with nibabel in one process (the
least any check can cost). Each preparation mode runs as ``python -m fedseg.data_prep fets2022`` in a fresh
process with 1 and with all cores; a second run in link mode shows the cost of an unchanged re-run.

    .venv/bin/python -m bench.prep_speed [--subjects 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from bench.common import run_measured, table, write_result

BASELINE = """
import sys, os, nibabel as nib, numpy as np
root = sys.argv[1]
for sid in sorted(d for d in os.listdir(root) if d.startswith("FeTS2022_")):
    for kind in ("t1", "t1ce", "t2", "flair", "seg"):
        np.asarray(nib.load(os.path.join(root, sid, f"{sid}_{kind}.nii.gz")).dataobj)
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    return parser.parse_args()


def make_source(work: str, subjects: int) -> tuple[str, float]:
    """``subjects`` full-size synthetic subjects (not timed): (source folder, its size in MB)."""
    from fedseg.data_prep.synthetic import Institution, SyntheticConfig, generate

    config = SyntheticConfig(shape=(240, 240, 155), institutions=[Institution(subjects=subjects)])
    print(f"generating {subjects} full-size subjects in {work} ...", flush=True)
    source = generate(os.path.join(work, "data"), config)
    size_mb = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(source) for f in fs) / 1e6
    return source, size_mb


def prepare_command(source: str, out: str, mode: str, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedseg.data_prep",
        "fets2022",
        source,
        "--out",
        out,
        "--mode",
        mode,
        "--workers",
        str(workers),
        "--quiet",
        "--val-fraction",
        "0.25",
    ]


def measure_rows(work: str, source: str, n: int) -> list[dict]:
    """The baseline, then every mode with 1 and all cores (link mode twice: the unchanged re-run), in that order."""
    cores = os.cpu_count() or 1
    base_wall, base_rss = run_measured([sys.executable, "-c", BASELINE, source])

    def row(what: str, mode: str, workers: int, wall: float, rss: float) -> dict:
        return {
            "what": what,
            "mode": mode,
            "workers": workers,
            "seconds": wall,
            "cases_per_second": n / wall,
            "peak_rss_mib": rss,
            "vs_baseline": wall / base_wall,
        }

    rows = [dict(row("baseline: nibabel decode of the 5 volumes", "-", 1, base_wall, base_rss), vs_baseline=1.0)]
    for mode in ("link", "copy", "preprocess"):
        for workers in sorted({1, cores}):
            out = os.path.join(work, f"out_{mode}_{workers}")
            shutil.rmtree(out, ignore_errors=True)
            command = prepare_command(source, out, mode, workers)
            rows.append(row("prepare", mode, workers, *run_measured(command)))
            if mode == "link" and workers == cores:
                rows.append(row("prepare again, nothing changed", mode, workers, *run_measured(command)))
    return rows


def markdown(rows: list[dict]) -> str:
    return table(
        ["what", "mode", "workers", "cases/s", "peak RSS (MiB)", "time vs baseline"],
        [
            [
                r["what"],
                r["mode"],
                r["workers"],
                f"{r['cases_per_second']:.2f}",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['vs_baseline']:.2f}",
            ]
            for r in rows
        ],
    )


def main() -> None:
    args = parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="fedseg_prep_bench_")
    source, size_mb = make_source(work, args.subjects)
    n = args.subjects
    rows = measure_rows(work, source, n)
    path = write_result("prep_speed", {"subjects": n, "shape": [240, 240, 155], "source_mb": size_mb, "rows": rows})
    print(markdown(rows))
    print(f"written {path}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
