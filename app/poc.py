"""A real federation on this machine: FLARE's POC mode, one process for the server and one per site.

``run_poc`` writes a POC project (sites named after the prepared partitions, ports picked free at run
time), starts the server and sites as separate processes, submits the job through the Flare API
session (what the admin console does), prints each finished round, downloads the result, writes the
report, and stops everything it started, also when interrupted. Each site finds its data through its
own ``FEDSEG_DATA_ROOT`` (the job itself holds no path).

A run that does not complete is a ``JobFailed`` naming the job's status, the rounds done of those planned
and the server's reason; ``run.json`` records the same. A server that dies mid-run leaves its job folder
(global model, reference buffer, round records): ``resume_settings`` continues the run from it.

The federation itself (project, kits, NVFlare's ``PocEnv``, its processes) is ``fedseg.app.poc_federation``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import time

import yaml

from fedseg.app.poc_federation import (  # noqa: F401  (importable from here, as before the split)
    ADMIN,
    PROJECT_NAME,
    SITES_CONNECT_SECONDS,
    FedSegPocEnv,
    allow_fedseg_classes,
    federation_processes,
    free_ports,
    poc_project,
    server_job_running,
    stop_leftovers,
    write_server_config,
)
from fedseg.controller import ROUND_METRICS_FILE
from fedseg.jobs.recipes import RUN_INFO_FILE, JobSettings, build_recipe
from fedseg.site_config import site_environment

# a job whose server process has been gone this long without the job having ended: the server died
SERVER_JOB_GONE_SECONDS = 20


def prepared_sites(data_root: str) -> list[str]:
    """Site names = the prepared partition folders (those holding a datalist)."""
    if not os.path.isdir(data_root):
        raise ValueError(f"{data_root}: no such folder (prepare the sites with `fedseg prepare` first)")
    sites = sorted(d for d in os.listdir(data_root) if os.path.isfile(os.path.join(data_root, d, "datalist.json")))
    if not sites:
        raise ValueError(f"{data_root}: no prepared site folders (run `fedseg prepare` first)")
    return sites


def _rounds_done(poc_workspace: str, job_id: str) -> int:
    # the shortest path: the run's own records, not a copy of an earlier run's (resumed_from/)
    paths = sorted(
        glob.glob(os.path.join(poc_workspace, "**", job_id, "**", ROUND_METRICS_FILE), recursive=True), key=len
    )
    if not paths:
        return 0
    with open(paths[0], encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# what the server logs when it ends a job early, most telling first (NVFlare 2.9's wording)
FAILURE_LOG_MARKERS = (
    "Alive clients",
    "Required client(s) dead",
    "All clients are dead",
    "Failing job",
    "Aborting job",
)


def failure_reason(logs: list[str]) -> str | None:
    """The server's own line on why it ended the job early, from its logs (None if it logged none)."""
    found: list[str] = []
    for path in sorted(set(logs)):
        with open(path, encoding="utf-8", errors="replace") as f:
            found += [line.strip() for line in f if any(m in line for m in FAILURE_LOG_MARKERS)]
    for marker in FAILURE_LOG_MARKERS:  # the most telling kind of line, its last occurrence
        lines = [line for line in found if marker in line]
        if lines:
            return lines[-1].rsplit(" - ", 1)[-1]
    return None


def server_logs(poc_workspace: str, result: str | None) -> list[str]:
    """The server's log and, in the downloaded result, its job's log (where a job's end is explained)."""
    logs = glob.glob(os.path.join(poc_workspace, "**", "server", "log.txt"), recursive=True)
    return logs + (glob.glob(os.path.join(result, "**", "log.txt"), recursive=True) if result else [])


def job_outcome(status: str, completed: int, planned: int, reason: str | None) -> dict:
    """``run.json``'s verdict: completed only when FLARE says COMPLETED and every round was recorded."""
    ok = status == "FINISHED:COMPLETED" and completed >= planned
    if not ok and not reason:
        reason = f"job status {status}" if status != "FINISHED:COMPLETED" else "the server recorded fewer rounds"
    return {
        "status": status,
        "completed": ok,
        "completed_rounds": completed,
        "planned_rounds": planned,
        "reason": None if ok else reason,
    }


class JobFailed(RuntimeError):
    """The POC job ended without completing its rounds; ``run_folder`` still holds what it left."""

    def __init__(self, message: str, run_folder: str | None) -> None:
        super().__init__(message)
        self.run_folder = run_folder


def run_poc(settings: JobSettings, data_root: str, workspace: str, timeout: float = 3600.0) -> str:
    """Run the job in a POC federation; returns the downloaded run folder (with ``run.json``)."""
    data_root = os.path.abspath(data_root)
    workspace = os.path.abspath(workspace)
    os.makedirs(workspace, exist_ok=True)
    fed_learn_port, admin_port = free_ports(2)
    project_path = os.path.join(workspace, "project.yml")
    with open(project_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(poc_project(settings.sites, fed_learn_port, admin_port), f, sort_keys=False)
    poc_workspace = os.path.join(workspace, "poc")
    restore = poc_environment(settings, data_root, poc_workspace)
    print(
        f"POC federation: server on localhost:{fed_learn_port} (admin {admin_port}), sites {', '.join(settings.sites)}",
        flush=True,
    )
    # num_clients too: PocEnv defaults it to 2 and refuses a clients list of any other length
    env = FedSegPocEnv(
        clients=list(settings.sites), num_clients=len(settings.sites), project_conf_path=project_path, username=ADMIN
    )
    env.server_config = settings.server_config()  # a continued run: the store its files were copied to
    recipe = build_recipe(settings)
    started = time.time()
    try:
        run = recipe.run(env)
        job_id = run.get_job_id()
        print(f"submitted job {job_id}", flush=True)
        status = wait_for_job(run, job_id, settings, poc_workspace, data_root, started, timeout)
        return collect_result(run, job_id, status, settings, poc_workspace, data_root, started)
    finally:
        env.stop(clean_up=False)
        left = stop_leftovers(poc_workspace)
        restore.close()  # this process's environment as it was
        print(f"POC federation stopped{f' ({left} lingering processes ended)' if left else ''}", flush=True)


def poc_environment(settings: JobSettings, data_root: str, poc_workspace: str) -> contextlib.ExitStack:
    """Set this process's environment for the POC run (``NVFLARE_POC_WORKSPACE``, and each site's data folder for
    the site processes POC starts, which inherit it); closing the returned stack puts it back as it was."""
    restore = contextlib.ExitStack()
    saved_poc_workspace = os.environ.get("NVFLARE_POC_WORKSPACE")

    def put_back() -> None:
        if saved_poc_workspace is None:
            os.environ.pop("NVFLARE_POC_WORKSPACE", None)
        else:
            os.environ["NVFLARE_POC_WORKSPACE"] = saved_poc_workspace

    restore.callback(put_back)  # last: after the sites' environment
    os.environ["NVFLARE_POC_WORKSPACE"] = poc_workspace
    restore.enter_context(
        site_environment(
            data_root,
            settings.cache_dir,
            allow_drills=bool(settings.faults),
            allow_scaffold=settings.algorithm == "scaffold",  # POC: the researcher's own machine
        )
    )
    return restore


def wait_for_job(
    run, job_id: str, settings: JobSettings, poc_workspace: str, data_root: str, started: float, timeout: float
) -> str:
    """Print each round as the server records it until the job ends; returns FLARE's status of the job.

    A server that died is a ``JobFailed`` (``server_stopped``); a job still running after ``timeout`` is aborted.
    """
    shown = 0
    first = settings.resume_files()[2] if settings.resume_from else 0
    seen, gone_since = False, None
    while True:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the session prints a line per connection
                status = run.get_status() or ""
        except Exception:  # the server does not answer: judged below by its job process
            status = ""
        # a server that died and was restarted (POC's start script does that) reports the job RUNNING for
        # ever, though nothing runs it: the server's job process tells
        running = server_job_running(poc_workspace, job_id)
        seen = seen or running
        finished = status.startswith(("FINISHED", "ABORTED", "FAILED"))
        gone_since = None if running or finished or not seen else (gone_since or time.time())
        if gone_since and time.time() - gone_since > SERVER_JOB_GONE_SECONDS:
            raise server_stopped(settings, poc_workspace, job_id, data_root, time.time() - started)
        done = _rounds_done(poc_workspace, job_id)
        for number in range(shown, done):
            print(
                f"  round {first + number + 1}/{first + settings.num_rounds} finished ({time.time() - started:.0f} s)",
                flush=True,
            )
        shown = done
        if finished:
            return status
        if time.time() - started > timeout:
            run.abort()
            raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s")
        time.sleep(3)


def collect_result(
    run, job_id: str, status: str, settings: JobSettings, poc_workspace: str, data_root: str, started: float
) -> str:
    """Download the ended job's result, record the verdict in its ``run.json`` and return its folder; a job that
    did not complete is a ``JobFailed`` (its folder still holds what it left)."""
    with contextlib.redirect_stdout(io.StringIO()):
        result = run.get_result(timeout=60, clean_up=False)
    if not result:
        raise RuntimeError(f"job {job_id} ended ({status}) but its result could not be downloaded")
    outcome = job_outcome(
        status, _rounds_done(result, ""), settings.num_rounds, failure_reason(server_logs(poc_workspace, result))
    )
    info = {
        "settings": settings.to_json(),
        "data_source": data_root,
        "wall_seconds": time.time() - started,
        "mode": "poc",
        "job_id": job_id,
        **outcome,
    }
    with open(os.path.join(result, RUN_INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    print(
        f"job {job_id}: {status}, {outcome['completed_rounds']} of {settings.num_rounds} rounds"
        + (f" ({outcome['reason']})" if outcome["reason"] else ""),
        flush=True,
    )
    if not outcome["completed"]:
        raise JobFailed(
            f"job {job_id} did not complete: {status}, {outcome['completed_rounds']} of "
            f"{settings.num_rounds} rounds ({outcome['reason']}); logs under {result}",
            result,
        )
    return result


def server_stopped(settings: JobSettings, poc_workspace: str, job_id: str, data_root: str, wall: float) -> JobFailed:
    """The failure of a run whose server died: ``run.json`` in the server's job folder, which keeps the last
    global model and FedRef's reference buffer, and the command that continues the run from them."""
    folders = glob.glob(os.path.join(poc_workspace, "**", "server", job_id), recursive=True)
    folder = folders[0] if folders else None
    done = _rounds_done(poc_workspace, job_id)
    reason = "the server process ended while the job was running"
    if folder:
        with open(os.path.join(folder, RUN_INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "settings": settings.to_json(),
                    "data_source": data_root,
                    "wall_seconds": wall,
                    "mode": "poc",
                    "job_id": job_id,
                    **job_outcome("SERVER_STOPPED", done, settings.num_rounds, reason),
                },
                f,
                indent=2,
            )
    print(f"job {job_id}: SERVER_STOPPED, {done} of {settings.num_rounds} rounds ({reason})", flush=True)
    return JobFailed(
        f"job {job_id} did not complete: the server stopped after {done} of {settings.num_rounds} rounds; "
        f"continue it with the same options and --resume-from {folder or poc_workspace}",
        folder,
    )


def resume_settings(settings: JobSettings, out: str) -> JobSettings:
    """The settings that finish a stopped run: its last global model and reference buffer copied into the new POC
    server's checkpoint store, ``<out>/resumed_from`` (a new POC federation rebuilds its workspace), the job
    naming that run (``resume_job``), and only the rounds still to run of the ``num_rounds`` planned; round
    numbers continue where the stopped run left off (the server takes them from the buffer)."""
    from dataclasses import replace

    from fedseg.jobs.recipes import RESUMED_RUN_NAME, stage_resume

    model, buffer, next_round = settings.resume_files()
    left = settings.num_rounds - next_round
    if left < 1:
        raise ValueError(
            f"{settings.resume_from}: the run already did {next_round} of {settings.num_rounds} rounds; "
            "give --rounds the total the run should reach"
        )
    store = os.path.join(os.path.abspath(out), "resumed_from")
    staged = stage_resume(settings, store)
    print(f"continuing from round {next_round}: {model} and {buffer}; {left} round(s) to run", flush=True)
    return replace(staged, resume_from=os.path.join(store, RESUMED_RUN_NAME), num_rounds=left)
