"""The operations behind ``fedseg compare`` and ``fedseg poc``: runs made from one set of settings, and their report.

``compare`` runs each algorithm (once per seed, if seeds are given) on the same sites and settings in FLARE's
simulator, or takes finished run folders, and writes the comparison (``fedseg.app.compare``). ``poc`` runs the job
in a POC federation (``fedseg.app.poc``), continuing a stopped run if the settings name one, and writes the report
of what ran, also when the job failed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import replace


def compare(
    settings,
    algorithms: Sequence[str],
    seeds: Sequence[int] | None,
    workspace: str,
    out: str,
    target: float,
    runs: Sequence[str] | None = None,
) -> int:
    """Compare ``runs`` (finished run folders), or else run every algorithm with ``settings`` first; 1 if a run
    failed (the comparison still covers the others)."""
    from fedseg.app.compare import write_comparison
    from fedseg.jobs.simulate import SimulationError, run_simulation

    folders, failed = list(runs or []), []
    if not folders:
        if settings is None or not settings.data_root:
            raise ValueError("give --data-root (to run the algorithms) or --runs (finished run folders)")
        plan = [(algorithm, seed) for seed in seeds or [None] for algorithm in algorithms]  # None: settings.seed
        for number, (algorithm, seed) in enumerate(plan, start=1):
            run = replace(settings, algorithm=algorithm)
            if seed is not None:  # one run folder per seed: the comparison pairs them seed by seed
                run = replace(run, seed=seed, name=f"{run.job_name}_seed{seed}")
            print(
                f"[{number}/{len(plan)}] {algorithm} (seed {run.seed}): {run.num_rounds} rounds on "
                f"{', '.join(run.sites)}",
                flush=True,
            )
            try:
                folders.append(run_simulation(run, workspace, data_source=run.data_root))
            except SimulationError as exc:
                print(f"  {algorithm} failed: {exc}", file=sys.stderr)
                failed.append(algorithm)
    index = write_comparison(folders, out, target=target)
    print(f"comparison: {index}")
    return 1 if failed else 0


def poc(settings, out: str) -> int:
    """A POC federation (separate server and site processes) on ``settings.data_root``, then the report in
    ``<out>/report``; 1 if the job did not complete."""
    from fedseg.app.artifacts import load_run
    from fedseg.app.poc import JobFailed, resume_settings, run_poc
    from fedseg.app.report import write_report

    out = os.path.abspath(out)
    if settings.resume_from:
        settings = resume_settings(settings, out)
    try:
        run, failure = run_poc(settings, settings.data_root, os.path.join(out, "workspace")), None
    except JobFailed as exc:  # still reported: what the rounds that ran show, and why it stopped
        run, failure = exc.run_folder, exc
    if run:
        try:
            print(f"report: {write_report(load_run(run), os.path.join(out, 'report'))}")
        except RuntimeError as exc:  # e.g. no round finished: nothing to report
            print(f"no report: {exc}", file=sys.stderr)
    if failure:
        print(f"fedseg poc: {failure}", file=sys.stderr)
        return 1
    return 0
