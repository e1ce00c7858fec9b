"""A job in FLARE's simulator: run it, judge it from its artifacts, and stage a stopped run to continue.

The simulator can return normally although a site failed, so completion is judged from the artifacts: the server
must have written one ``round_metrics.jsonl`` line per round. ``run.json`` in the run folder records the settings,
the data source and the wall time for the report.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import replace

from nvflare.recipe.sim_env import SimEnv

from fedseg.atomic import write_json
from fedseg.controller import ROUND_METRICS_FILE
from fedseg.jobs.recipes import build_recipe
from fedseg.jobs.settings import JobSettings
from fedseg.policy import with_allow_list
from fedseg.server_config import SERVER_CONFIG_FILE
from fedseg.site_config import site_environment
from fedseg.wire import GPU_QUANTIZATION

RUN_INFO_FILE = "run.json"
SIMULATOR_CACHE_NAME = "fedseg_cache"  # beside the run folders of a simulator workspace
SIMULATOR_STORE_NAME = "fedseg_checkpoints"  # the simulated server's checkpoint store (runs to continue)
RESUMED_RUN_NAME = "resumed"  # the stopped run's plain name in the local server's store


class SimulationError(RuntimeError):
    """The simulator ended without completing every round."""


def run_simulation(settings: JobSettings, workspace_root: str, data_source: str | None = None) -> str:
    """Run the job in FLARE's simulator; returns the run folder (``<workspace_root>/<job name>``).

    Raises ``SimulationError`` unless every round completed; ``run.json`` is written either way.
    """
    workspace_root = os.path.abspath(workspace_root)
    run_folder = os.path.join(workspace_root, settings.job_name)
    _check_runnable(settings, run_folder)
    if os.path.isdir(run_folder):
        shutil.rmtree(run_folder)  # a previous run of the same job; the simulator would mix the two
    if not settings.cache_dir:  # the simulated sites' caches outlive a run: the next run starts at once
        settings = replace(settings, cache_dir=os.path.join(workspace_root, SIMULATOR_CACHE_NAME))
    if settings.resume_from:
        settings = stage_resume(settings, os.path.join(workspace_root, SIMULATOR_STORE_NAME, settings.job_name))
    recipe = build_recipe(settings)
    # the simulator enforces a class allow-list on non-BYOC jobs: ours, the one a hospital installs
    write_json(os.path.join(run_folder, "local", "resources.json"), with_allow_list({"format_version": 2}, "simulator"))
    # the simulated server's own settings (FLARE copies <run>/local into every participant's local/)
    if settings.server_config():
        write_json(os.path.join(run_folder, "local", SERVER_CONFIG_FILE), settings.server_config())
    env = SimEnv(clients=list(settings.sites), num_threads=len(settings.sites), workspace_root=workspace_root)
    started = time.time()
    failure = None
    try:
        with site_environment(
            settings.data_root,
            settings.cache_dir,
            allow_drills=bool(settings.faults),
            allow_scaffold=settings.algorithm == "scaffold",
        ):
            recipe.run(env)
    except Exception as exc:  # the simulator raises for a failed job; we still report what it left
        failure = exc
    return _judge(settings, run_folder, data_source, time.time() - started, failure)


def _check_runnable(settings: JobSettings, run_folder: str) -> None:
    if settings.resume_from and os.path.realpath(settings.resume_from).startswith(os.path.realpath(run_folder)):
        raise ValueError(
            f"resume from {settings.resume_from} into another workspace or job name: "
            f"{run_folder} is cleared before a run"
        )
    if settings.quantization in GPU_QUANTIZATION:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"quantization {settings.quantization!r} runs NVFlare's bitsandbytes quantiser on CUDA "
                "and this machine has no GPU; use float16"
            )


def _judge(settings: JobSettings, run_folder: str, data_source: str | None, wall: float, failure) -> str:
    """Write ``run.json`` from what the run left; the run folder if every round completed, else SimulationError."""
    records = _round_records(run_folder)
    completed = len(records)
    ok = failure is None and (completed >= settings.num_rounds or _budget_spent(settings, records))
    reason = None if ok else (f"{failure.__class__.__name__}: {failure}" if failure else "no error raised")
    write_json(
        os.path.join(run_folder, RUN_INFO_FILE),
        {
            "settings": settings.to_json(),
            "data_source": data_source,
            "wall_seconds": wall,
            "mode": "simulator",
            "status": "COMPLETED" if ok else "FAILED",
            "completed": ok,
            "completed_rounds": completed,
            "planned_rounds": settings.num_rounds,
            "reason": reason,
        },
    )
    if not ok:
        raise SimulationError(
            f"simulation of {settings.job_name}: FAILED, {completed} of {settings.num_rounds} rounds ({reason}); "
            f"logs: {run_folder}/<site>/log.txt"
        ) from failure
    return run_folder


def stage_resume(settings: JobSettings, store: str) -> JobSettings:
    """Copy the stopped run in ``settings.resume_from`` into a local server's checkpoint store (simulator, POC) as
    ``<store>/resumed/``; the job names it (``resume_job``), the local server is told the store."""
    model, buffer, _ = settings.resume_files()
    target = os.path.join(store, RESUMED_RUN_NAME)
    staged = os.path.join(target, "staging")
    if os.path.isdir(staged):
        shutil.rmtree(staged)
    os.makedirs(staged)
    for path in (model, buffer):
        shutil.copy2(path, os.path.join(staged, os.path.basename(path)))
    for path in (model, buffer):  # replace the previous copy only once both files are in
        os.replace(os.path.join(staged, os.path.basename(path)), os.path.join(target, os.path.basename(path)))
    os.rmdir(staged)
    return replace(settings, resume_job=RESUMED_RUN_NAME, checkpoint_store=store)


def _round_records(run_folder: str) -> list[dict]:
    paths = glob.glob(os.path.join(run_folder, "**", ROUND_METRICS_FILE), recursive=True)
    if not paths:
        return []
    with open(sorted(paths, key=len)[0], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _budget_spent(settings: JobSettings, records: list[dict]) -> bool:
    """A run on the challenge clock ends early, and complete, once its simulated time passes the budget."""
    total = records[-1].get("simulated_total_seconds") if records else None
    return bool(settings.clock_cases) and total is not None and total > settings.time_budget_seconds
