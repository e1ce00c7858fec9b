"""Federation scale: how a round's time outside the sites' own work grows with the number of sites.

FeTS2022's partitioning_1 has 23 institutions. One tiny synthetic institution per site (2 subjects on a
32x32x24 grid: one training and one validation case), sites ``site-1..site-N`` prepared by
``fedseg.data_prep.fets2022.prepare_sites``, and a FLARE simulator federation of N = 3, 8 and 23 sites (all of
partitioning_1) with a tiny network (channels 8-16-32, one local epoch of one step, one torch thread per
site, no cross-site evaluation): a round then costs little training, and what grows with N is the
federation itself. The simulator runs every site as its own worker process (``SimEnv(num_threads=N)``).

From the server's round records (``round_metrics.jsonl``), per round:
- ``round``: the round's wall time as the controller measures it, from sending the task to the record
  written after aggregation (and the FedRef step);
- ``slowest site``: the largest train + validation seconds of a site in that round (its own work, as
  the trainer times it);
- ``rest`` = round - slowest site: everything on the round's critical path that is not that site's
  work: FLARE messaging (task fetch polling, model (de)serialisation, transfer), the server's aggregation
  and update step, and on this machine the sites' CPU contention (N worker processes share the cores).
  It is an upper bound of the server-side + messaging time: the controller records no separate
  aggregation time, so the two cannot be told apart from the records.
- ``gap``: the server's time between one round's record and the next round's task (persisting the
  global model), from the records' timestamps.
Round 0 (workers starting, data caching, first model transfer) is left out of every median and reported
on its own. Also the whole run's wall time and the peak memory of the simulator's process tree (sum over
its processes, sampled every second: RSS, and PSS which counts shared pages once) and the PSS each site
added over the smallest federation. Ratios are against the smallest federation of the same invocation.

Reading the numbers: a site waits the server's ``task_request_interval`` (FLARE's default 2 s, in the
WAIT_TIME header of every task) after sending a result before it asks for the next task, so the rest has
a floor of about 2 s per round whatever N is; and with N worker processes on a few cores the sites' own
(wall-clock) work is inflated by contention, which shows in the slowest and median site work.

A run where a site dropped out (FLARE's simulator now and then loses a worker as it starts) has fewer
sites in a round record than planned: it is stopped as soon as that is seen, reported, and run once more.

    .venv/bin/python -m bench.federation_scale [--sizes 3 8 23] [--rounds 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench.common import institutions, json_ready, table, write_result
from bench.measure import cpu_seconds, raise_peak, stop_tree

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTITIONING_1 = os.path.join(REPO_ROOT, "tests", "data", "fets2022", "partitioning_1.csv")
SHAPE = (32, 32, 24)
SUBJECTS_PER_SITE = 2
STYLES = [  # intensity scale, bias, noise, tumour radius (mm): the tiny test data's three kinds, in turn
    (1000.0, 0.10, 0.03, (24, 34)),
    (400.0, 0.25, 0.05, (20, 30)),
    (2500.0, 0.15, 0.04, (28, 38)),
]
NETWORK = dict(local_epochs=1, crop=SHAPE, channels=(8, 16, 32), threads=1, cross_site_eval=False)

CHILD = r"""
import json, sys
from fedseg.jobs.recipes import JobSettings, run_simulation
settings = JobSettings(**json.loads(sys.argv[1]))
folder = run_simulation(settings, sys.argv[2], data_source="synthetic, one institution per site")
with open(sys.argv[3], "w") as f:
    json.dump({"run_folder": folder}, f)
"""


# -- the arithmetic (unit-tested in tests/unit/test_federation_scale.py) ----------------------------------------
def partition_ids(csv_path: str = PARTITIONING_1) -> list[int]:
    """The institutions (Partition_ID) of a FeTS partitioning CSV, in order."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        return sorted({int(row["Partition_ID"]) for row in csv.DictReader(f)})


def lost_sites(rounds: list[dict], planned: list[str]) -> list[str]:
    """'round N: site-X (why)' for every planned site without an accepted update in a round record."""
    problems = []
    for record in rounds:
        number = record.get("round")
        present = set(record.get("sites", {}))
        absent = sorted((set(planned) - present) | set(record.get("missing", [])))
        problems += [f"round {number}: {site} (no result)" for site in absent]
        problems += [
            f"round {number}: {site} (rejected: {why})" for site, why in sorted(record.get("rejected", {}).items())
        ]
    return problems


def round_breakdown(record: dict) -> dict:
    """One round: its seconds, the slowest site's own work (train + validation), and the rest."""
    work = {
        site: (m.get("train_seconds") or 0.0) + (m.get("val_seconds") or 0.0) for site, m in record["sites"].items()
    }
    slowest = max(work.values()) if work else 0.0
    return {
        "round": record["round"],
        "seconds": record["seconds"],
        "slowest_site_seconds": slowest,
        "slowest_site": max(work, key=work.get) if work else None,
        "rest_seconds": record["seconds"] - slowest,
        "median_site_seconds": statistics.median(work.values()) if work else 0.0,
    }


def summarise_rounds(rounds: list[dict], planned: list[str]) -> dict:
    """Medians over the rounds after round 0 (start-up), and the sites lost on the way."""
    used = [r for r in rounds if r.get("round", 0) != 0]
    if not used:
        raise ValueError("no round after round 0 to summarise: run at least 2 rounds")
    parts = [round_breakdown(r) for r in used]
    by_round = {r["round"]: r for r in rounds}
    gaps = [
        (r["time"] - r["seconds"]) - by_round[r["round"] - 1]["time"]
        for r in used
        if r["round"] - 1 in by_round and r["round"] - 1 != 0 and "time" in r
    ]
    sites = len(planned)
    rest = statistics.median(p["rest_seconds"] for p in parts)
    first = round_breakdown(by_round[0]) if 0 in by_round else None
    return {
        "sites": sites,
        "rounds_summarised": [p["round"] for p in parts],
        "round0_seconds": first["seconds"] if first else None,  # start-up: reported, in no median
        "round0_slowest_site_seconds": first["slowest_site_seconds"] if first else None,
        "round_seconds": statistics.median(p["seconds"] for p in parts),
        "slowest_site_seconds": statistics.median(p["slowest_site_seconds"] for p in parts),
        "median_site_seconds": statistics.median(p["median_site_seconds"] for p in parts),
        "rest_seconds": rest,
        "rest_per_site_seconds": rest / sites,
        "gap_seconds": statistics.median(gaps) if gaps else None,
        "lost": lost_sites(rounds, planned),
        "per_round": parts,
    }


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each size's medians as a multiple of the smallest federation's, and the memory each added site took."""
    base = min(rows, key=lambda r: r["sites"])
    out = []
    for row in rows:
        row = dict(row, ratio_base_sites=base["sites"])
        for key in ("round_seconds", "rest_seconds", "slowest_site_seconds", "round0_seconds"):
            row[f"{key}_ratio"] = row[key] / base[key] if base.get(key) and row.get(key) is not None else None
        if "peak_memory" in row and "peak_memory" in base and row["sites"] > base["sites"]:
            row["pss_mib_per_added_site"] = (row["peak_memory"]["pss_mib"] - base["peak_memory"]["pss_mib"]) / (
                row["sites"] - base["sites"]
            )
        out.append(row)
    return out


# -- running one federation ------------------------------------------------------------------------------
def prepare_data(work: str, n_sites: int) -> str:
    """Site folders site-1..site-N, one synthetic institution each (generated once, kept in ``work``)."""
    from fedseg.data_prep.fets2022 import prepare_sites
    from fedseg.data_prep.synthetic import SyntheticConfig, generate

    rows = ((SUBJECTS_PER_SITE, *STYLES[i % len(STYLES)]) for i in range(n_sites))
    source = generate(os.path.join(work, "data"), SyntheticConfig(shape=SHAPE, institutions=institutions(rows)))
    sites = os.path.join(work, "sites")
    prepare_sites(source, sites, partitions=list(range(1, n_sites + 1)), validation_fraction=0.5)
    return sites


def _round_records(workspace: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(workspace, "**", "round_metrics.jsonl"), recursive=True), key=len)
    if not paths:
        return []
    with open(paths[0], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def watch(child: subprocess.Popen, workspace: str, planned: list[str], started: float, timeout: float):
    """Sample the federation's memory every second until it ends; (peak memory, why it was stopped or None).

    Stopped as soon as a round lacks a planned site (no measurement then: waiting costs time) or past timeout.
    """
    peak = {"rss_mib": 0.0, "pss_mib": 0.0, "largest_process_rss_mib": 0.0, "processes": 0}
    stopped = None
    while child.poll() is None:
        raise_peak(peak, child.pid)
        lost = lost_sites(_round_records(workspace), planned)
        if lost:
            stopped = "a site was lost: " + "; ".join(lost[:3])
        elif time.perf_counter() - started > timeout:
            stopped = f"over {timeout:.0f} s"
        if stopped:
            stop_tree(child.pid)
            break
        time.sleep(1.0)
    return peak, stopped


def run_federation(sites_root: str, n_sites: int, rounds: int, work: str, algorithm: str, timeout: float) -> dict:
    """One simulator federation in a child process, its memory sampled; stopped early when a site is lost."""
    planned = [f"site-{i}" for i in range(1, n_sites + 1)]
    settings = dict(
        NETWORK, algorithm=algorithm, sites=planned, num_rounds=rounds, data_root=sites_root, name=f"scale_{n_sites}"
    )
    workspace = os.path.join(work, f"runs_{n_sites}")
    shutil.rmtree(workspace, ignore_errors=True)
    os.makedirs(workspace)
    done_file = os.path.join(workspace, "done.json")
    log_path = os.path.join(workspace, "simulator.log")
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(settings), workspace, done_file],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            peak, stopped = watch(child, workspace, planned, started, timeout)
        finally:
            if child.poll() is None:
                stop_tree(child.pid)
            child.wait()
    wall = time.perf_counter() - started
    cpu = {k: after - before for (k, before), after in zip(cpu_before.items(), cpu_seconds().values())}
    records = _round_records(workspace)
    result = {
        "sites": n_sites,
        "planned_rounds": rounds,
        "completed_rounds": len(records),
        "wall_seconds": wall,
        "peak_memory": peak,
        "returncode": child.returncode,
        "cpu_seconds": {
            "federation": cpu["federation"],
            "machine": cpu["machine"],
            # a shared machine: CPU time that other work took while this federation ran
            "others": cpu["machine"] - cpu["federation"] - cpu["this_script"],
        },
        "stopped": stopped,
        "log": log_path,
        "lost": lost_sites(records, planned),
    }
    return with_round_summary(result, records, planned, os.path.join(workspace, settings["name"]), done_file)


def with_round_summary(result: dict, records: list[dict], planned: list[str], run_folder: str, done_file: str):
    """A finished run gets its round medians (and the simulator's own wall time); a failed one says so."""
    if not os.path.exists(done_file) and not result["stopped"]:
        result["stopped"] = f"simulation failed (exit {result['returncode']}); see {result['log']}"
    if records and not result["stopped"]:
        run_info = glob.glob(os.path.join(run_folder, "run.json"))
        if run_info:
            with open(run_info[0], encoding="utf-8") as f:
                result["simulator_wall_seconds"] = json.load(f).get("wall_seconds")
        result.update(summarise_rounds(records, planned))
    return result


def measure(sites_root: str, n_sites: int, rounds: int, work: str, algorithm: str, timeout: float) -> dict:
    """A run with every site in every round; a run that lost a site is reported and run once more."""
    attempts = []
    for attempt in (1, 2):
        result = run_federation(sites_root, n_sites, rounds, work, algorithm, timeout)
        if not result["stopped"] and not result["lost"]:
            result["earlier_attempts"] = attempts
            return result
        print(
            f"{n_sites} sites: attempt {attempt} incomplete ({result['stopped'] or '; '.join(result['lost'][:3])}); "
            f"log {result['log']}",
            flush=True,
        )
        attempts.append({k: result[k] for k in ("stopped", "lost", "completed_rounds", "wall_seconds", "peak_memory")})
    result["earlier_attempts"] = attempts[:-1]
    result["incomplete"] = True
    return result


def parse_args() -> argparse.Namespace:
    """The sizes and rounds; refused before any work when round 0 would be the only round or a size too big."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 8, 23])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algorithm", default="fedref")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before a federation is stopped")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 0 is left out of the medians")
    args.institutions = partition_ids()
    if max(args.sizes) > len(args.institutions):
        parser.error(f"partitioning_1 has {len(args.institutions)} institutions; sizes up to {len(args.institutions)}")
    return args


def measure_sizes(args: argparse.Namespace) -> list[dict]:
    """Every size, smallest first, on data made once for the largest; the scratch folder removed unless --work."""
    work = args.work or tempfile.mkdtemp(prefix="federation_scale_")
    try:
        sites_root = prepare_data(work, max(args.sizes))
        rows = []
        for n in sorted(args.sizes):
            result = measure(sites_root, n, args.rounds, work, args.algorithm, args.timeout)
            rows.append(result)
            print(
                f"{n} sites: {result.get('round_seconds', float('nan')):.2f} s per round, "
                f"whole run {result['wall_seconds']:.0f} s, peak PSS {result['peak_memory']['pss_mib']:.0f} MiB",
                flush=True,
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def payload(args: argparse.Namespace, summarised: list[dict], rows: list[dict]) -> dict:
    """The result file's content: the sizes with their ratios, the setting they were measured in, the failures."""
    return {
        "partitioning": "partitioning_1",
        "institutions": len(args.institutions),
        "algorithm": args.algorithm,
        "rounds": args.rounds,
        "rounds_in_medians": "rounds 1.. (round 0, start-up, left out)",
        "data": {
            "shape": list(SHAPE),
            "subjects_per_site": SUBJECTS_PER_SITE,
            "train_cases_per_site": 1,
            "validation_cases_per_site": 1,
        },
        "network": json_ready(NETWORK),
        "simulator_threads": "one worker process per site (SimEnv num_threads = sites)",
        "cpu_note": "per size, cpu_seconds.others is the CPU time other work on this shared machine took "
        "during the federation (machine busy time - the federation's process tree - this script)",
        "sizes": summarised,
        "failed": [{k: v for k, v in r.items() if k != "log"} for r in rows if "round_seconds" not in r],
    }


def markdown(summarised: list[dict]) -> str:
    """The sizes as the markdown table of docs/benchmarks.md."""
    return table(
        [
            "sites",
            "round (s)",
            "slowest site work (s)",
            "median site work (s)",
            "rest (s)",
            "rest per site (s)",
            "gap (s)",
            "round x",
            "rest x",
            "round 0 (s)",
            "run wall (s)",
            "peak PSS (MiB)",
            "peak RSS (MiB)",
            "retries",
        ],
        [
            [
                r["sites"],
                f"{r['round_seconds']:.2f}",
                f"{r['slowest_site_seconds']:.2f}",
                f"{r['median_site_seconds']:.2f}",
                f"{r['rest_seconds']:.2f}",
                f"{r['rest_per_site_seconds']:.3f}",
                "-" if r["gap_seconds"] is None else f"{r['gap_seconds']:.2f}",
                f"{r['round_seconds_ratio']:.2f}",
                f"{r['rest_seconds_ratio']:.2f}",
                f"{r['round0_seconds']:.1f}",
                f"{r['wall_seconds']:.0f}",
                f"{r['peak_memory']['pss_mib']:.0f}",
                f"{r['peak_memory']['rss_mib']:.0f}",
                len(r["earlier_attempts"]),
            ]
            for r in summarised
        ],
    )


def main() -> None:
    args = parse_args()
    rows = measure_sizes(args)
    summarised = with_ratios([r for r in rows if "round_seconds" in r])
    for row in summarised:
        row.pop("log", None)
    path = write_result("federation_scale", payload(args, summarised, rows))
    print(markdown(summarised))
    print(
        f"medians over rounds 1..{args.rounds - 1} (round 0 left out); ratios vs {summarised[0]['sites'] if summarised else '-'} "
        f"sites in this invocation; written {path}"
    )


if __name__ == "__main__":
    main()
