"""A federation in FLARE's simulator, watched from outside: stopped and run again as soon as it loses a site.

Why: with tens of site processes starting at once, FLARE's simulator now and then loses one ("Connection
reset by peer" in the server's log), and a validate task sent to it then waits for good; the rest of such a
run measures nothing. ``complete_run`` runs each attempt in a child process, watches the server's log and
round records, and returns the first attempt with every site in every round and a completed job.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import time

from bench.convergence import incomplete_rounds
from bench.measure import stop_tree

FIRST_ROUND_LIMIT = 420  # seconds without a first round record: the attempt is stopped and retried
LOST_SITE_LOG = "Communication error with client"  # FLARE's simulator, when a site's worker process is gone


def _simulate(job_json: dict, workspace: str) -> None:
    from fedseg.jobs.recipes import JobSettings, run_simulation

    run_simulation(JobSettings(**job_json), workspace)


def lost_sites(run_folder: str) -> list[str]:
    """Sites FLARE's simulator reported lost in the server's log, or that a round record names as missing."""
    lost = []
    for path in glob.glob(os.path.join(run_folder, "server", "log.txt")):
        with open(path, encoding="utf-8", errors="replace") as f:
            lost += [line.split(LOST_SITE_LOG, 1)[1].split(":")[0].strip() for line in f if LOST_SITE_LOG in line]
    for path in glob.glob(os.path.join(run_folder, "server", "*", "round_metrics.jsonl")):
        with open(path, encoding="utf-8") as f:
            lost += [site for line in f if line.strip() for site in json.loads(line).get("missing", [])]
    return sorted(set(lost))


def recorded_rounds(run_folder: str) -> int:
    paths = glob.glob(os.path.join(run_folder, "server", "*", "round_metrics.jsonl"))
    return sum(1 for path in paths for line in open(path, encoding="utf-8") if line.strip())


def watched_simulation(job, workspace: str) -> str:
    """One attempt in a child process, stopped as soon as a site is lost (or no round is recorded in
    FIRST_ROUND_LIMIT s): with 33 site processes starting at once, FLARE's simulator now and then loses one
    ("Connection reset by peer"), and its validate task then waits for it for good. Returns the run folder."""
    run_folder = os.path.join(workspace, job.job_name)
    child = multiprocessing.get_context("spawn").Process(target=_simulate, args=(job.to_json(), workspace))
    child.start()
    started = time.time()
    while child.is_alive():
        child.join(5)
        lost = lost_sites(run_folder)
        if lost or (not recorded_rounds(run_folder) and time.time() - started > FIRST_ROUND_LIMIT):
            print(f"  {job.job_name}: stopping this attempt ({'lost ' + ', '.join(lost) if lost else 'no round'})")
            stop_tree(child.pid)
            child.join()
            break
    return run_folder


def complete_run(job, workspace: str, attempts: int = 4):
    """The first attempt with every site in every round and a completed job; says why each other one failed."""
    from fedseg.app.artifacts import RunArtifactsError, load_run

    for attempt in range(1, attempts + 1):
        try:
            run = load_run(watched_simulation(job, workspace))
        except RunArtifactsError as error:
            print(f"  {job.job_name}: attempt {attempt} of {attempts} left no run ({error})", flush=True)
            continue
        problems = incomplete_rounds(run) or ([] if run.run_info.get("completed") else [run.run_info.get("reason")])
        if not problems:
            return run
        print(f"  {job.job_name}: attempt {attempt} of {attempts}: {'; '.join(map(str, problems[:3]))}", flush=True)
    raise RuntimeError(f"{job.job_name}: no complete run in {attempts} attempts")
