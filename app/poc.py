"""A real federation on this machine: FLARE's POC mode, one process for the server and one per site.

``run_poc`` writes a POC project (sites named after the prepared partitions, ports picked free at run
time), starts the server and sites as separate processes, submits the job through the Flare API
session (what the admin console does), prints each finished round, downloads the result, writes the
report, and stops everything it started, also when interrupted. Each site finds its data through its
own ``FEDSEG_DATA_ROOT`` (the job itself holds no path).
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import socket
import time

import yaml

from fedseg.controller import ROUND_METRICS_FILE
from fedseg.site_config import site_environment
from fedseg.jobs.recipes import RUN_INFO_FILE, JobSettings, build_recipe

PROJECT_NAME = "fedseg_poc"
ADMIN = "admin@fedseg.local"


def free_ports(count: int) -> list[int]:
    """Ports the OS reports free now (bound and released together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def poc_project(sites: list[str], fed_learn_port: int, admin_port: int) -> dict:
    """A POC project.yml: one server on localhost at the given ports, the sites, one project admin."""
    return {
        "api_version": 3,
        "name": PROJECT_NAME,
        "description": "FedRef-Seg POC federation on localhost",
        "participants": [
            {"name": "server", "type": "server", "org": "fedseg", "default_host": "localhost",
             "fed_learn_port": fed_learn_port, "admin_port": admin_port},
            {"name": ADMIN, "type": "admin", "org": "fedseg", "role": "project_admin"},
            *({"name": site, "type": "client", "org": "fedseg"} for site in sites),
        ],
        "builders": [
            {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
             "args": {"template_file": ["master_template.yml"]}},
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
            {"path": "fedseg.app.kit_policy.AllowListBuilder"},  # configuration-only jobs run our classes
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }


def prepared_sites(data_root: str) -> list[str]:
    """Site names = the prepared partition folders (those holding a datalist)."""
    if not os.path.isdir(data_root):
        raise ValueError(f"{data_root}: no such folder (prepare the sites with `fedseg prepare` first)")
    sites = sorted(d for d in os.listdir(data_root) if os.path.isfile(os.path.join(data_root, d, "datalist.json")))
    if not sites:
        raise ValueError(f"{data_root}: no prepared site folders (run `fedseg prepare` first)")
    return sites


def _rounds_done(poc_workspace: str, job_id: str) -> int:
    paths = glob.glob(os.path.join(poc_workspace, "**", job_id, "**", ROUND_METRICS_FILE), recursive=True)
    if not paths:
        return 0
    with open(paths[0], encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def run_poc(settings: JobSettings, data_root: str, workspace: str, timeout: float = 3600.0) -> str:
    """Run the job in a POC federation; returns the downloaded run folder (with ``run.json``)."""
    from nvflare.recipe.poc_env import PocEnv

    data_root = os.path.abspath(data_root)
    workspace = os.path.abspath(workspace)
    os.makedirs(workspace, exist_ok=True)
    fed_learn_port, admin_port = free_ports(2)
    project_path = os.path.join(workspace, "project.yml")
    with open(project_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(poc_project(settings.sites, fed_learn_port, admin_port), f, sort_keys=False)
    poc_workspace = os.path.join(workspace, "poc")
    saved_poc_workspace = os.environ.get("NVFLARE_POC_WORKSPACE")
    os.environ["NVFLARE_POC_WORKSPACE"] = poc_workspace
    # the site processes POC starts inherit this environment: each reads its data folder from it
    restore = contextlib.ExitStack()
    restore.enter_context(site_environment(data_root, settings.cache_dir, allow_drills=bool(settings.faults)))
    print(f"POC federation: server on localhost:{fed_learn_port} (admin {admin_port}), sites {', '.join(settings.sites)}",
          flush=True)
    # num_clients too: PocEnv defaults it to 2 and refuses a clients list of any other length
    env = PocEnv(clients=list(settings.sites), num_clients=len(settings.sites), project_conf_path=project_path,
                 username=ADMIN)
    recipe = build_recipe(settings)
    started = time.time()
    try:
        run = recipe.run(env)
        job_id = run.get_job_id()
        print(f"submitted job {job_id}", flush=True)
        shown = 0
        while True:
            with contextlib.redirect_stdout(io.StringIO()):  # the session prints a line per connection
                status = run.get_status() or ""
            done = _rounds_done(poc_workspace, job_id)
            for number in range(shown, done):
                print(f"  round {number + 1}/{settings.num_rounds} finished ({time.time() - started:.0f} s)", flush=True)
            shown = done
            if status.startswith("FINISHED") or status.startswith("ABORTED") or status.startswith("FAILED"):
                break
            if time.time() - started > timeout:
                run.abort()
                raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s")
            time.sleep(3)
        with contextlib.redirect_stdout(io.StringIO()):
            result = run.get_result(timeout=60, clean_up=False)
        if not result:
            raise RuntimeError(f"job {job_id} ended ({status}) but its result could not be downloaded")
        wall = time.time() - started
        info = {"settings": settings.to_json(), "data_source": data_root, "wall_seconds": wall, "mode": "poc",
                "job_id": job_id, "status": status, "completed_rounds": _rounds_done(result, "")}
        with open(os.path.join(result, RUN_INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        if not status.startswith("FINISHED"):
            raise RuntimeError(f"job {job_id} ended with status {status}; logs under {result}")
        return result
    finally:
        env.stop(clean_up=False)
        left = stop_leftovers(poc_workspace)
        restore.close()  # this process's environment as it was
        if saved_poc_workspace is None:
            os.environ.pop("NVFLARE_POC_WORKSPACE", None)
        else:
            os.environ["NVFLARE_POC_WORKSPACE"] = saved_poc_workspace
        print(f"POC federation stopped{f' ({left} lingering processes ended)' if left else ''}", flush=True)


def federation_processes(poc_workspace: str) -> list:
    """Processes whose command line runs from this POC workspace (server, sites, their start scripts)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(poc_workspace in part for part in process.info["cmdline"] or []):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_leftovers(poc_workspace: str, grace: float = 20.0) -> int:
    """Wait for the federation's processes to end after POC's stop; end the ones that linger."""
    import psutil

    deadline = time.time() + grace
    while time.time() < deadline:
        if not federation_processes(poc_workspace):
            return 0
        time.sleep(0.5)
    lingering = federation_processes(poc_workspace)
    for process in lingering:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(lingering, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return len(lingering)
