"""``bench.site_scale --flare``: the same full-size sites measured inside FLARE instead of in a bare process.

Each size runs as ``fedseg simulate --profile fets2022`` with this one site for two rounds, from a fresh
cache. The site trains in the simulator's worker process: its RSS, and the whole simulator's, are sampled
every 200 ms while the job runs. Results: ``bench/results/site_scale_flare.json``, written after every size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.common import load_result, table, write_result
from bench.measure import process_tree

RESULT_NAME = "site_scale_flare"


def simulate_command(root: str, workspace: str, steps: int, val_cases: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedseg.app",
        "simulate",
        "--profile",
        "fets2022",
        "--data-root",
        root,
        "--sites",
        "site-1",
        "--rounds",
        "2",
        "--local-steps",
        str(steps),
        "--val-max-cases",
        str(val_cases),
        "--no-cross-site-eval",
        "--workspace",
        workspace,
    ]


def sample_peaks(process: subprocess.Popen) -> tuple[int, int]:
    """Until the simulator ends: (peak RSS of its site worker process, peak RSS summed over its tree) in bytes."""
    import psutil

    site_peak = tree_peak = 0
    while process.poll() is None:
        try:
            tree = process_tree(process.pid)
            rss = {p.pid: p.memory_info().rss for p in tree}
            workers = [p.pid for p in tree if "simulator_worker" in " ".join(p.cmdline())]
        except psutil.Error:
            continue
        tree_peak = max(tree_peak, sum(rss.values()))
        site_peak = max([site_peak, *(rss[pid] for pid in workers)])
        time.sleep(0.2)
    return site_peak, tree_peak


def flare_site(work: str, site_for, cases: int, steps: int, val_cases: int) -> dict:
    """The site of ``cases`` cases (``site_for(cases)`` makes it) inside FLARE, 2 rounds; its figures."""
    root = os.path.join(work, f"flare_sites_{cases}")
    os.makedirs(root, exist_ok=True)
    link = os.path.join(root, "site-1")
    if not os.path.islink(link):
        os.symlink(site_for(cases), link)
    workspace = os.path.join(work, f"flare_ws_{cases}")
    subprocess.run(["rm", "-rf", workspace], check=True)
    command = simulate_command(root, workspace, steps, val_cases)
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    site_peak, tree_peak = sample_peaks(process)
    if process.returncode != 0:
        raise RuntimeError(
            f"fedseg simulate with {cases} cases failed (exit {process.returncode}): {' '.join(command)}"
        )
    from fedseg.app.artifacts import load_run
    from fedseg.cache import cache_size_bytes
    from fedseg.jobs.recipes import SIMULATOR_CACHE_NAME

    records = load_run(os.path.join(workspace, "fedseg_fedref")).rounds
    site = [r["sites"]["site-1"] for r in records]
    return {
        "cases": cases,
        "site_process_peak_rss_mib": site_peak / 2**20,
        "simulator_peak_rss_mib": tree_peak / 2**20,
        "wall_seconds": time.time() - started,
        # read here, on the site's own disk: the sites no longer send their cache's size (it sums brain volumes)
        "cache_mb": cache_size_bytes(os.path.join(workspace, SIMULATOR_CACHE_NAME, "site-1")) / 1e6,
        "caching_seconds": site[-1].get("cache_seconds"),
        "seconds_per_step": site[-1]["train_seconds"] / site[-1]["num_steps"],
        "round_seconds": [r["seconds"] for r in records],
    }


def markdown(done: dict[int, dict]) -> str:
    return table(
        [
            "cases",
            "site process peak RSS (MiB)",
            "whole simulator peak RSS (MiB)",
            "s/step",
            "caching (s)",
            "disk cache (MB)",
            "wall (s)",
        ],
        [
            [
                r["cases"],
                f"{r['site_process_peak_rss_mib']:.0f}",
                f"{r['simulator_peak_rss_mib']:.0f}",
                f"{r['seconds_per_step']:.2f}",
                f"{r['caching_seconds']:.0f}",
                f"{r['cache_mb']:.0f}",
                f"{r['wall_seconds']:.0f}",
            ]
            for r in (done[k] for k in sorted(done))
        ],
    )


def measure_in_flare(args, work: str, site_for) -> None:
    """``--flare``: each size as a one-site simulator federation; results in ``site_scale_flare.json``."""
    done = {r["cases"]: r for r in (load_result(RESULT_NAME).get("sizes") or [])} if args.resume else {}
    for cases in args.sizes:
        if cases in done:
            continue
        print(f"{cases} cases inside FLARE: caching, then 2 rounds of {args.steps} steps ...", flush=True)
        done[cases] = flare_site(work, site_for, cases, args.steps, args.val_cases)
        sizes = [done[k] for k in sorted(done)]
        path = write_result(
            RESULT_NAME,
            {
                "profile": "fets2022",
                "steps_per_round_measured": args.steps,
                "rounds": 2,
                "val_cases_per_round_measured": args.val_cases,
                "sizes": sizes,
                "site_rss_ratio_largest_vs_smallest": sizes[-1]["site_process_peak_rss_mib"]
                / sizes[0]["site_process_peak_rss_mib"],
            },
        )
    print(markdown(done))
    print(f"written {path}")
