"""A full-size FeTS2022 site's memory, disk and time as its number of cases grows (8, 32, 96 by default).

Data: a pool of distinct full-size (240x240x155) synthetic subjects, made once under ``--work`` and reused;
each site of N cases lists N subject folders whose files are hard links to the pool's (a new path is a new
case to the site's cache). Generation time is not measured. Each site is split 80/20 into training and
validation, as ``fedseg prepare`` does by default.

Per size, in a fresh process, with the real-data profile (``--profile fets2022``, local steps cut to
``--steps`` so that a CPU finishes): caching every case (a fresh cache folder), then ``--rounds`` local rounds
(validation of the model on the per-round subset, then the local steps). A thread samples the process's
RSS every 50 ms, so each phase's peak is its own. Recorded: peak RSS during caching, training and
validation; seconds per training step (median, first step of the process left out); first and later round
wall time; disk cache size. Baseline in the same run (``--baseline-sizes``): the previous pipeline's
in-memory ``CacheDataset`` of full volumes, whose RSS after caching grows with every case.

    .venv/bin/python -m bench.site_scale [--sizes 8 32 96] [--steps 5] [--rounds 2] [--work bench/.work/site_scale]
                                         [--resume] [--device cpu|cuda] [--flare]

``--flare`` measures the same sites inside FLARE instead (``fedseg simulate --profile fets2022``, one site,
two rounds): the peak RSS of the simulator's worker process that runs the site, and of the whole simulator.

Results: ``bench/results/site_scale.json`` (written after every size; ``--resume`` skips sizes already there;
``--device cuda`` writes ``site_scale_cuda.json``), then the table of what each FeTS2022 institution can
expect, derived from them (``--table`` prints it alone).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import time

from bench.common import load_result, run_python, table, write_result
from bench.site_scale_flare import measure_in_flare

RESULT_NAME = "site_scale"
SHAPE = (240, 240, 155)
VALIDATION_FRACTION = 0.2

CHILD = r"""
import json, os, statistics, sys, threading, time
import psutil, torch
from fedseg.settings import profile
from fedseg.trainer import SiteTrainer, parse_args
from fedseg.settings import training_arguments
from fedseg.cache import cache_size_bytes

folder, cache_root, steps, rounds, device, val_cases = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                                        sys.argv[5], int(sys.argv[6]))
settings = profile("fets2022")
settings.local_steps, settings.val_max_cases = steps, val_cases
process = psutil.Process()
phase, peaks, stop = ["start"], {}, threading.Event()

def sample():
    while not stop.is_set():
        rss = process.memory_info().rss
        peaks[phase[0]] = max(peaks.get(phase[0], 0), rss)
        time.sleep(0.05)

threading.Thread(target=sample, daemon=True).start()
if device == "cuda":
    torch.backends.cudnn.benchmark = True
phase[0] = "caching"
started = time.perf_counter()
trainer = SiteTrainer(folder, parse_args(training_arguments(settings) + ["--cache_dir", cache_root]),
                      device=torch.device(device))
caching = time.perf_counter() - started
rounds_out, step_times = [], []
for r in range(rounds):
    started = time.perf_counter()
    phase[0] = "validation"
    val = trainer.validate()
    phase[0] = "training"
    result = trainer.train()
    rounds_out.append({"wall_seconds": time.perf_counter() - started, "val_seconds": val["val_seconds"],
                       "val_cases": val["n_cases"], "train_seconds": result["train_seconds"],
                       "steps": result["num_steps"], "seconds_per_step": result["train_seconds"] / result["num_steps"]})
stop.set()
time.sleep(0.1)
gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
print(json.dumps({
    "train_cases": len(trainer.data.train_cases), "val_cases": len(trainer.data.val_cases),
    "caching_seconds": caching, "cache_mb": cache_size_bytes(trainer.data.cache_dir) / 1e6,
    "peak_rss_mib": {k: v / 2**20 for k, v in peaks.items()}, "rounds": rounds_out, "peak_gpu_mib": gpu,
}))
"""

BASELINE_CHILD = r"""
import json, resource, sys
from monai.data import CacheDataset
from fedseg.data import load_site_datalist, validation_transforms
training, validation = load_site_datalist(sys.argv[1])
CacheDataset(training + validation, validation_transforms(), cache_rate=1.0, num_workers=1, progress=False)
print(json.dumps({"cases": len(training) + len(validation),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_pool(work: str, distinct: int) -> str:
    """``distinct`` full-size synthetic subjects (made once; reused when already there)."""
    from fedseg.data_prep.synthetic import Institution, SyntheticConfig, generate

    folder = os.path.join(work, "pool")
    done = os.path.join(folder, "MICCAI_FeTS2022_TrainingData")
    if os.path.isdir(done) and len([n for n in os.listdir(done) if n.startswith("FeTS")]) >= distinct:
        return done
    print(f"making {distinct} full-size synthetic subjects in {folder} (once)", flush=True)
    config = SyntheticConfig(shape=SHAPE, seed=0, institutions=[Institution(subjects=distinct)])
    return generate(folder, config, progress=lambda d, t, n: print(f"  {d}/{t} {n}", flush=True))


def make_site(work: str, pool: str, cases: int) -> str:
    """A prepared site folder of ``cases`` cases: new subject ids whose files are hard links into the pool."""
    from fedseg.data_prep.layout import MODALITIES, SEG, subject_id

    site = os.path.join(work, f"site_{cases}")
    datalist = os.path.join(site, "datalist.json")
    if os.path.isfile(datalist):
        return site
    sources = sorted(n for n in os.listdir(pool) if n.startswith("FeTS"))
    entries = []
    for index in range(cases):
        source, sid = sources[index % len(sources)], subject_id(20000 + index)
        os.makedirs(os.path.join(site, sid), exist_ok=True)
        for kind in (*MODALITIES, SEG):
            target = os.path.join(site, sid, f"{sid}_{kind}.nii.gz")
            if not os.path.exists(target):
                os.link(os.path.join(pool, source, f"{source}_{kind}.nii.gz"), target)
        entries.append({"image": [f"{sid}/{sid}_{m}.nii.gz" for m in MODALITIES], "label": f"{sid}/{sid}_{SEG}.nii.gz"})
    validation = max(1, round(cases * VALIDATION_FRACTION))
    with open(datalist, "w", encoding="utf-8") as f:
        json.dump({"training": entries[validation:], "validation": entries[:validation]}, f)
    return site


def summarise(raw: dict) -> dict:
    """The figures of one size: per-phase peaks, step time (first step of the process left out), rounds."""
    rounds = raw["rounds"]
    steps = [r["seconds_per_step"] for r in rounds[1:]] or [rounds[0]["seconds_per_step"]]
    val_per_case = [r["val_seconds"] / max(r["val_cases"], 1) for r in rounds[1:]] or [rounds[0]["val_seconds"]]
    peaks = raw["peak_rss_mib"]
    return {
        "cases": raw["train_cases"] + raw["val_cases"],
        "train_cases": raw["train_cases"],
        "val_cases": raw["val_cases"],
        "peak_rss_mib": {k: round(peaks.get(k, 0.0), 1) for k in ("caching", "training", "validation")},
        "peak_rss_mib_max": round(max(peaks.values()), 1),
        "seconds_per_step": statistics.median(steps),
        "val_seconds_per_case": statistics.median(val_per_case),
        "caching_seconds": raw["caching_seconds"],
        "caching_seconds_per_case": raw["caching_seconds"] / max(raw["train_cases"] + raw["val_cases"], 1),
        "first_round_seconds": rounds[0]["wall_seconds"],
        "later_round_seconds": statistics.median(r["wall_seconds"] for r in rounds[1:]) if len(rounds) > 1 else None,
        "cache_mb": raw["cache_mb"],
        "cache_mb_per_case": raw["cache_mb"] / max(raw["train_cases"] + raw["val_cases"], 1),
        "peak_gpu_mib": raw.get("peak_gpu_mib"),
        "rounds": rounds,
    }


def institution_sizes(csv_path: str) -> list[tuple[int, int]]:
    """(partition, number of subjects) of a FeTS2022 partitioning CSV."""
    counts: dict[int, int] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            counts[int(row["Partition_ID"])] = counts.get(int(row["Partition_ID"]), 0) + 1
    return sorted(counts.items())


def hospital_table(
    sizes: list[dict], steps_per_round: int, val_max_cases: int, csv_path: str, gpu: dict | None = None
) -> list[list]:
    """What each institution can expect, from the measured sizes: RAM, disk cache, time per local round.

    RAM: the largest peak measured (it does not grow with the number of cases); disk: cache MB per case x
    cases; first use: caching seconds per case x cases; a local round: the profile's steps x seconds per
    step plus the per-round validation subset x seconds per validation case.
    """
    ram = max(s["peak_rss_mib_max"] for s in sizes) / 1024
    per_case_mb = statistics.median(s["cache_mb_per_case"] for s in sizes)
    cache_s = statistics.median(s["caching_seconds_per_case"] for s in sizes)
    step = statistics.median(s["seconds_per_step"] for s in sizes)
    val_case = statistics.median(s["val_seconds_per_case"] for s in sizes)
    rows = []
    for partition, subjects in institution_sizes(csv_path):
        val = min(max(1, round(subjects * VALIDATION_FRACTION)), val_max_cases)
        cpu_round = steps_per_round * step + val * val_case
        row = [
            partition,
            subjects,
            f"{ram:.1f}",
            f"{subjects * per_case_mb / 1024:.1f}",
            f"{subjects * cache_s / 60:.1f}",
            f"{cpu_round / 60:.1f}",
        ]
        if gpu:
            row.append(f"{steps_per_round * gpu['seconds_per_step'] + val * gpu['val_seconds_per_case']:.0f}")
        rows.append(row)
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 96])
    parser.add_argument("--baseline-sizes", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--distinct", type=int, default=8, help="distinct synthetic subjects behind the cases")
    parser.add_argument("--steps", type=int, default=5, help="local steps per round (the profile's are cut to this)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--val-cases",
        type=int,
        default=8,  # a site refuses fewer than its min_val_cases (fedseg.site_config; default 8)
        help="validation cases per round (the profile's subset is cut to this; time is per case)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", default=os.path.join("bench", ".work", "site_scale"))
    parser.add_argument("--resume", action="store_true", help="keep the sizes already in the results file")
    parser.add_argument("--csv", default=os.path.join("tests", "data", "fets2022", "partitioning_1.csv"))
    parser.add_argument("--table", action="store_true", help="only print the per-institution table from the results")
    parser.add_argument(
        "--flare",
        action="store_true",
        help="measure each size inside a FLARE simulator federation instead (site_scale_flare.json)",
    )
    return parser.parse_args()


def save(name: str, args: argparse.Namespace, done: dict[int, dict], baseline: dict[int, dict]) -> str:
    """The result file as it stands (written after every size, so that --resume can keep them)."""
    sizes = [done[k] for k in sorted(done)]
    extra = {}
    if sizes:
        smallest, largest = sizes[0], sizes[-1]
        extra = {
            "rss_ratio_largest_vs_smallest": largest["peak_rss_mib_max"] / smallest["peak_rss_mib_max"],
            "step_ratio_largest_vs_smallest": largest["seconds_per_step"] / smallest["seconds_per_step"],
        }
    payload = {
        "profile": "fets2022",
        "steps_per_round_measured": args.steps,
        "rounds": args.rounds,
        "val_cases_per_round_measured": args.val_cases,
        "device": args.device,
        "shape": list(SHAPE),
        "distinct_subjects": args.distinct,
    }
    return write_result(name, {**payload, "sizes": sizes, "baseline": [baseline[k] for k in sorted(baseline)], **extra})


def measure_size(args: argparse.Namespace, work: str, pool: str, cases: int) -> dict:
    """One size in a fresh process, from an empty cache (caching is part of the measurement)."""
    site = make_site(work, pool, cases)
    cache_root = os.path.join(work, f"cache_{cases}")
    subprocess.run(["rm", "-rf", cache_root], check=True)
    print(f"{cases} cases: caching, then {args.rounds} rounds of {args.steps} steps ...", flush=True)
    started = time.time()
    size = summarise(
        run_python(CHILD, site, cache_root, str(args.steps), str(args.rounds), args.device, str(args.val_cases))
    )
    print(
        f"  {time.time() - started:.0f} s; peak RSS {size['peak_rss_mib_max']:.0f} MiB, "
        f"{size['seconds_per_step']:.2f} s/step, cache {size['cache_mb']:.0f} MB",
        flush=True,
    )
    return size


def markdown(sizes: list[dict]) -> str:
    return table(
        [
            "cases",
            "train/val",
            "peak RSS caching / training / validation (MiB)",
            "s/step",
            "s per val case",
            "caching (s)",
            "first round (s)",
            "later round (s)",
            "disk cache (MB)",
        ],
        [
            [
                s["cases"],
                f"{s['train_cases']}/{s['val_cases']}",
                " / ".join(f"{s['peak_rss_mib'][k]:.0f}" for k in ("caching", "training", "validation")),
                f"{s['seconds_per_step']:.2f}",
                f"{s['val_seconds_per_case']:.1f}",
                f"{s['caching_seconds']:.0f}",
                f"{s['first_round_seconds']:.0f}",
                f"{s['later_round_seconds'] or 0:.0f}",
                f"{s['cache_mb']:.0f}",
            ]
            for s in sizes
        ],
    )


def measure_outside_flare(args: argparse.Namespace, work: str, pool: str) -> None:
    """Every size (then the in-memory baseline, CPU only) not kept by --resume; the tables of what was found."""
    name = RESULT_NAME if args.device == "cpu" else f"{RESULT_NAME}_{args.device}"
    previous = load_result(name) if args.resume else {}
    done = {s["cases"]: s for s in previous.get("sizes", [])}
    baseline = {b["cases"]: b for b in previous.get("baseline", [])}
    for cases in args.sizes:
        if cases in done:
            print(f"{cases} cases: kept from the previous results", flush=True)
            continue
        done[cases] = measure_size(args, work, pool, cases)
        save(name, args, done, baseline)
    for cases in args.baseline_sizes:
        if cases in baseline or args.device != "cpu":
            continue
        print(f"baseline (in-memory CacheDataset of full volumes), {cases} cases ...", flush=True)
        baseline[cases] = run_python(BASELINE_CHILD, make_site(work, pool, cases))
        save(name, args, done, baseline)
    path = save(name, args, done, baseline)
    print(markdown([done[k] for k in sorted(done)]))
    if baseline:
        print(
            table(
                ["cases", "baseline peak RSS after caching (MiB)"],
                [[b["cases"], f"{b['peak_rss_mib']:.0f}"] for b in baseline.values()],
            )
        )
    if args.device == "cpu":
        print_hospital_table(args.csv)
    print(f"written {path}")


def main() -> None:
    args = parse_args()
    if args.table:
        print_hospital_table(args.csv)
        return
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    pool = make_pool(work, args.distinct)
    if args.flare:
        measure_in_flare(args, work, lambda cases: make_site(work, pool, cases))
        return
    measure_outside_flare(args, work, pool)


def print_hospital_table(csv_path: str) -> None:
    """The per-institution table from the stored results (CPU, and GPU where measured), without measuring."""
    from fedseg.settings import profile

    sizes = load_result(RESULT_NAME).get("sizes") or []
    if not sizes:
        raise SystemExit(f"no {RESULT_NAME}.json results yet: run python -m bench.site_scale first")
    gpu_sizes = load_result(f"{RESULT_NAME}_cuda").get("sizes") or []
    gpu = (
        {k: statistics.median(s[k] for s in gpu_sizes) for k in ("seconds_per_step", "val_seconds_per_case")}
        if gpu_sizes
        else None
    )
    fets = profile("fets2022")
    print(
        table(
            ["partition", "subjects", "RAM (GiB)", "disk cache (GiB)", "first caching (min)", "local round, CPU (min)"]
            + (["local round, GPU (s)"] if gpu else []),
            hospital_table(sizes, fets.local_steps, fets.val_max_cases, csv_path, gpu),
        )
    )


if __name__ == "__main__":
    main()
