"""A FeTS2022-sized federation on one machine: partitioning_1's institutions as simulator sites, at full size.

Sites: the first ``--sites`` institutions of partitioning_1 (23: all of them; 1: a one-site federation), each with
the cases a round of that institution works on: min(subjects, ``--cap``) full-size (240x240x155) synthetic cases,
``--distinct`` subjects behind them under new names (hard links, as ``bench.site_scale`` makes them), split 80/20.
A round's work does not depend on the rest of a site's cases: 50 local steps whatever its size, validation of
min(8, 20% of its subjects); with the default cap of 40 every site validates what the institution would.

The federation is ``fedseg simulate --profile fets2022`` on these sites for ``--rounds`` rounds, without cross-site
evaluation, ``--threads`` torch threads per site (default 1; every training option of the site trainer can be
given, over the profile). Sampled every second while it runs: host memory (PSS and RSS of the simulator's
process tree, RSS of each site's process), the machine's CPU use, and on a GPU nvidia-smi's utilisation and
memory per process. Baseline in the same invocation: the bare compute step of the same settings
on the same device (``bench.step_split``'s, in a fresh process, before the federation).

From the round records, rounds after round 0 (start-up, caching): per site its seconds per step, data share
(``data_seconds`` / ``train_seconds``) and validation; per round its wall time and the compute bound (the sum of
the sites' steps x the bare step). ``federation_step_vs_compute`` = median over sites and rounds of (seconds per
step / the bare step). Also the sites' first validation (round 0, after their warm-up) against the later ones.
Results: ``bench/results/fets_scale.json``, one entry per device and number of sites (kept by later runs).

    .venv/bin/python -m bench.fets_scale [--sites 23] [--rounds 3] [--device cuda] [--local-steps 50] [--cap 40]
                                         [--work bench/.work/fets_scale] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import (
    add_training_options,
    given_training_options,
    machine,
    save_entry,
    table,
)
from bench.federation_scale import PARTITIONING_1, lost_sites
from bench.measure import raise_peak, stop_tree
from bench.site_scale import VALIDATION_FRACTION, institution_sizes, make_pool, make_site

RESULT_NAME = "fets_scale"
SMOKE_SHAPE = (32, 32, 24)
# over the fets2022 profile: one torch thread a site (the sites share the machine), a round's validation of an
# institution of 40 cases or more
SITE_DEFAULTS = {"threads": 1, "val_max_cases": 8}


# -- the arithmetic (unit-tested in tests/unit/test_gpu_bench.py) ----------------------------------------------
def round_sizes(subjects: list[int], cap: int) -> list[dict]:
    """Per institution: the cases a round works on (at most ``cap``), and the validation cases of a round."""
    out = []
    for n in subjects:
        cases = min(n, cap)
        out.append({"subjects": n, "cases": cases, "val_cases": min(8, max(1, round(cases * VALIDATION_FRACTION)))})
    return out


def site_round(metrics: dict, bare_step: float) -> dict:
    """One site's round from its record: seconds per step, data share, step over the bare step, validation."""
    steps = max(int(metrics.get("num_steps") or 0), 1)
    train = float(metrics.get("train_seconds") or 0.0)
    return {
        "seconds_per_step": train / steps,
        "data_share": float(metrics.get("data_seconds") or 0.0) / train if train else None,
        "step_vs_compute": train / steps / bare_step,
        "val_seconds_per_case": float(metrics.get("val_seconds") or 0.0) / max(int(metrics.get("n_cases") or 0), 1),
        "steps": steps,
    }


def summarise(records: list[dict], bare_step: float) -> dict:
    """Rounds after round 0: medians over sites and rounds, the compute bound of each round, round 0's validation."""
    later = [r for r in records if r.get("round", 0) != 0]
    if not later:
        raise ValueError("no round after round 0: run at least 2 rounds")
    per_site = [site_round(m, bare_step) for r in later for m in r["sites"].values()]
    rounds = []
    for r in later:
        bound = sum(site_round(m, bare_step)["steps"] for m in r["sites"].values()) * bare_step
        rounds.append({"round": r["round"], "seconds": r["seconds"], "compute_bound_seconds": bound})
    round0 = [m for r in records if r.get("round") == 0 for m in r["sites"].values()]
    first = [site_round(m, bare_step)["val_seconds_per_case"] for m in round0]
    later_val = statistics.median(s["val_seconds_per_case"] for s in per_site)
    shares = [s["data_share"] for s in per_site if s["data_share"] is not None]
    return {
        "bare_step_seconds": bare_step,
        "federation_step_vs_compute": statistics.median(s["step_vs_compute"] for s in per_site),
        "federation_step_vs_compute_max": max(s["step_vs_compute"] for s in per_site),
        "seconds_per_step": statistics.median(s["seconds_per_step"] for s in per_site),
        "data_share": statistics.median(shares) if shares else None,
        "round_seconds": statistics.median(r["seconds"] for r in rounds),
        "compute_bound_seconds": statistics.median(r["compute_bound_seconds"] for r in rounds),
        "round_vs_compute_bound": statistics.median(r["seconds"] / r["compute_bound_seconds"] for r in rounds),
        "val_seconds_per_case": later_val,
        "validation_first_vs_later": statistics.median(first) / later_val if first and later_val else None,
        "rounds": rounds,
    }


def gpu_share(samples: list[dict], records: list[dict]) -> float | None:
    """Mean GPU utilisation (%) over the samples taken during the rounds after round 0."""
    spans = [(r["time"] - r["seconds"], r["time"]) for r in records if r.get("round", 0) != 0 and "time" in r]
    inside = [s["gpu_util"] for s in samples if "gpu_util" in s and any(a <= s["t"] <= b for a, b in spans)]
    return statistics.mean(inside) if inside else None


# -- the run ---------------------------------------------------------------------------------------------------
def prepare_sites(args: argparse.Namespace, work: str) -> tuple[str, list[dict]]:
    """``<work>/fed_sites_<N>/site-K`` for the first N institutions (links to site folders made once)."""
    sizes = round_sizes([n for _, n in institution_sizes(PARTITIONING_1)][: args.sites], args.cap)
    root = os.path.join(work, f"fed_sites_{args.sites}")
    os.makedirs(root, exist_ok=True)
    pool = None if args.smoke else make_pool(work, args.distinct)
    for index, size in enumerate(sizes, 1):
        link = os.path.join(root, f"site-{index}")
        if not os.path.islink(link):
            os.symlink(smoke_site(work, size["cases"]) if args.smoke else make_site(work, pool, size["cases"]), link)
    return root, sizes


def smoke_site(work: str, cases: int) -> str:
    """A tiny prepared site of ``cases`` 32x32x24 subjects (``--smoke``: checks the script, measures nothing)."""
    from fedseg.data_prep.fets2022 import prepare_sites as prepare
    from fedseg.data_prep.synthetic import Institution, SyntheticConfig, generate

    folder = os.path.join(work, f"smoke_{cases}")
    if not os.path.isdir(os.path.join(folder, "site-1")):
        config = SyntheticConfig(shape=SMOKE_SHAPE, institutions=[Institution(subjects=max(cases, 2))])
        prepare(generate(os.path.join(folder, "data"), config), folder, partitions=[1], validation_fraction=0.2)
    return os.path.join(folder, "site-1")


def overrides(args: argparse.Namespace) -> dict:
    """The training settings changed from the fets2022 profile (command-line names without dashes)."""
    chosen = dict(SITE_DEFAULTS)
    if args.smoke:
        chosen.update(crop=(16, 16, 16), channels=(4, 8), local_steps=2)
    return {**chosen, **given_training_options(args)}


def bare_step(args: argparse.Namespace, root: str, sizes: list[dict], work: str) -> float:
    """The bare compute step of these settings on this device, in a fresh process (bench.step_split), on the
    smallest site (its cache, made here, is the federation's)."""
    smallest = min(range(len(sizes)), key=lambda i: sizes[i]["cases"]) + 1
    folder = os.path.join(root, f"site-{smallest}")
    spec = {"profile": "fets2022", "overrides": overrides(args), "folder": folder, "device": args.device, "steps": 5}
    spec["cache"] = os.path.join(work, "fed_cache")
    code = (
        "import json, sys; from bench.step_split import bare_step as f; print(json.dumps(f(json.loads(sys.argv[1]))))"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_step"]


def simulate_command(args: argparse.Namespace, root: str, workspace: str, cache: str) -> list[str]:
    command = [sys.executable, "-m", "fedseg.app", "simulate", "--profile", "fets2022", "--data-root", root]
    command += ["--sites", *[f"site-{i}" for i in range(1, args.sites + 1)], "--rounds", str(args.rounds)]
    command += ["--no-cross-site-eval", "--workspace", workspace, "--cache-dir", cache]
    for name, value in overrides(args).items():
        command += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, tuple) else [value])]
    return command


def gpu_query() -> dict:
    """nvidia-smi now: the GPU's utilisation (%), its used memory and each process's (MiB); {} without it."""
    queries = {"gpu": "--query-gpu=utilization.gpu,memory.used", "apps": "--query-compute-apps=pid,used_memory"}
    out = {}
    try:
        for key, query in queries.items():
            text = subprocess.run(
                ["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10
            ).stdout
            out[key] = [[float(v) for v in line.split(",")] for line in text.strip().splitlines() if line.strip()]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}
    first = (out.get("gpu") or [[None, None]])[0]
    return {"util": first[0], "used_mib": first[1], "apps": {int(p): m for p, m in out.get("apps", [])}}


def site_processes(pid: int) -> dict[int, tuple[str, float]]:
    """The simulator's site processes under ``pid``: {pid: (site, RSS in MiB)}."""
    import psutil

    from bench.measure import process_tree

    found = {}
    for process in process_tree(pid):
        try:
            words = process.cmdline()
            if "--client" in words:
                found[process.pid] = (words[words.index("--client") + 1], process.memory_info().rss / 2**20)
        except (psutil.Error, IndexError):
            continue
    return found


def round_records(workspace: str) -> list[dict]:
    import glob

    paths = sorted(glob.glob(os.path.join(workspace, "**", "round_metrics.jsonl"), recursive=True), key=len)
    if not paths:
        return []
    with open(paths[0], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def watch(child: subprocess.Popen, cuda: bool, timeout: float) -> dict:
    """Sample the federation every second until it ends (or ``timeout``): memory, CPU, and the GPU on CUDA."""
    import psutil

    peak = {"rss_mib": 0.0, "pss_mib": 0.0, "largest_process_rss_mib": 0.0, "processes": 0}
    site_rss, site_gpu, samples, started = {}, {}, [], time.time()
    psutil.cpu_percent(None)
    while child.poll() is None:
        if time.time() - started > timeout:
            stop_tree(child.pid)
            return {"stopped": f"over {timeout:.0f} s", "peak": peak, "samples": samples}
        raise_peak(peak, child.pid)
        sites = site_processes(child.pid)
        for site, rss in sites.values():
            site_rss[site] = max(site_rss.get(site, 0.0), rss)
        sample = {"t": time.time(), "cpu_percent": psutil.cpu_percent(None)}
        gpu = gpu_query() if cuda else {}
        if gpu:
            sample.update(gpu_util=gpu["util"], gpu_used_mib=gpu["used_mib"])
            for pid, mib in gpu["apps"].items():
                if pid in sites:
                    site_gpu[sites[pid][0]] = max(site_gpu.get(sites[pid][0], 0.0), mib)
        samples.append(sample)
        time.sleep(1.0)
    return {"stopped": None, "peak": peak, "site_rss_mib": site_rss, "site_gpu_mib_smi": site_gpu, "samples": samples}


def run_federation(args: argparse.Namespace, root: str, work: str) -> tuple[dict, list[dict]]:
    """The simulator federation in a child process, watched; (what was watched, the round records)."""
    workspace = os.path.join(work, f"fed_ws_{args.sites}")
    subprocess.run(["rm", "-rf", workspace], check=True)
    os.makedirs(workspace)
    command = simulate_command(args, root, workspace, os.path.join(work, "fed_cache"))
    started = time.time()
    with open(os.path.join(workspace, "simulator.log"), "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            watched = watch(child, args.device == "cuda", args.timeout)
        finally:
            if child.poll() is None:
                stop_tree(child.pid)
            child.wait()
    watched.update(
        wall_seconds=time.time() - started,
        returncode=child.returncode,
        command=" ".join(command[1:]).replace(work, "<work>"),
    )
    return watched, round_records(workspace)


def site_figures(records: list[dict]) -> dict:
    """What each site recorded of itself: torch's peak GPU memory, warm-up and caching seconds (their maxima)."""
    out: dict[str, dict] = {}
    for record in records:
        for site, m in record["sites"].items():
            mine = out.setdefault(site, {})
            for key in ("peak_gpu_mib", "warmup_seconds", "cache_seconds"):
                if m.get(key) is not None:
                    mine[key] = max(mine.get(key, 0.0), float(m[key]))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=23, help="the first N institutions of partitioning_1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cap", type=int, default=40, help="cases per site at most (a round's work is the same)")
    parser.add_argument("--distinct", type=int, default=4, help="distinct synthetic subjects behind the cases")
    parser.add_argument("--device", default="cuda", help="where the sites train (what the bare step is timed on)")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds before the federation is stopped")
    parser.add_argument("--work", default=os.path.join("bench", ".work", "fets_scale"))
    parser.add_argument("--smoke", action="store_true", help="tiny sites and network: checks the script only")
    add_training_options(parser)  # --local-steps, --threads, ... over the fets2022 profile and SITE_DEFAULTS
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 0 (start-up) is reported apart")
    if args.smoke:
        args.cap = min(args.cap, 4)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    root, sizes = prepare_sites(args, work)
    print(f"{args.sites} sites ({sum(s['cases'] for s in sizes)} cases), bare step on {args.device} ...", flush=True)
    bare = bare_step(args, root, sizes, work)
    print(f"  bare step {bare:.3f} s; the federation, {args.rounds} rounds ...", flush=True)
    load_before = os.getloadavg()
    watched, records = run_federation(args, root, work)
    planned = [f"site-{i}" for i in range(1, args.sites + 1)]
    entry = {
        "sites": args.sites,
        "sizes": sizes,
        "rounds_recorded": len(records),
        "lost": lost_sites(records, planned),
        "machine": machine(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "settings": overrides(args),
        "site_figures": site_figures(records),
        **{k: v for k, v in watched.items() if k != "samples"},
    }
    if len(records) >= 2:
        entry.update(summarise(records, bare))
        spans = [(r["time"] - r["seconds"], r["time"]) for r in records if r.get("round", 0) != 0]
        busy = [s["cpu_percent"] for s in watched["samples"] if any(a <= s["t"] <= b for a, b in spans)]
        entry.update(gpu_util_percent=gpu_share(watched["samples"], records), cpu_percent=statistics.mean(busy or [0]))
    path = save_entry(
        RESULT_NAME, f"{args.device}/{args.sites}_sites", entry, DEFINITIONS, work if args.smoke else None
    )
    print(markdown(entry))
    print(f"written {path}")


DEFINITIONS = {
    "federation_step_vs_compute": "median over sites and rounds after round 0 of a site's seconds per step in the "
    "federation (train_seconds / num_steps of its round record) / the bare compute step of the same settings on "
    "the same device (bench.step_split, SiteTrainer.step on a batch held on the device), same invocation",
    "data_share": "median over sites and rounds of data_seconds / train_seconds in the round records",
    "compute_bound_seconds": "the sum of the sites' steps in a round x the bare compute step",
    "validation_first_vs_later": "median site validation seconds per case in round 0 / in the later rounds",
}


def markdown(entry: dict) -> str:
    if "round_seconds" not in entry:
        return f"{entry['sites']} sites: {entry['rounds_recorded']} rounds recorded, stopped: {entry.get('stopped')}"
    gpu = entry.get("gpu_util_percent")
    rows = [
        [
            entry["sites"],
            f"{entry['round_seconds']:.1f}",
            f"{entry['compute_bound_seconds']:.1f}",
            f"{entry['round_vs_compute_bound']:.2f}",
            f"{entry['seconds_per_step']:.3f}",
            f"{entry['federation_step_vs_compute']:.2f}",
            f"{100 * (entry['data_share'] or 0):.1f}%",
            f"{entry['val_seconds_per_case']:.2f}",
            "-" if entry["validation_first_vs_later"] is None else f"{entry['validation_first_vs_later']:.2f}",
            f"{entry['peak']['pss_mib'] / 1024:.1f}",
            f"{max(entry.get('site_rss_mib', {}).values() or [0]) / 1024:.1f}",
            "-" if gpu is None else f"{gpu:.0f}%",
            f"{entry['cpu_percent']:.0f}%",
        ]
    ]
    headers = ["sites", "round (s)", "compute bound (s)", "round / bound", "s/step", "step vs compute"]
    headers += ["data share", "val s/case", "val first/later", "host PSS (GiB)", "largest site RSS (GiB)", "GPU util"]
    return table(headers + ["CPU busy"], rows) + f"\nlost: {entry['lost'] or 'none'}"


if __name__ == "__main__":
    main()
