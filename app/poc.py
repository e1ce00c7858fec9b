"""A real federation on this machine: FLARE's POC mode, one process for the server and one per site.

``run_poc`` writes a POC project (sites named after the prepared partitions, ports picked free at run
time), starts the server and sites as separate processes, submits the job through the Flare API
session (what the admin console does), prints each finished round, downloads the result, writes the
report, and stops everything it started, also when interrupted. Each site finds its data through its
own ``FEDSEG_DATA_ROOT`` (the job itself holds no path).

A run that does not complete is a ``JobFailed`` naming the job's status, the rounds done of those planned
and the server's reason; ``run.json`` records the same. A server that dies mid-run leaves its job folder
(global model, reference buffer, round records): ``resume_settings`` continues the run from it.
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
from nvflare.recipe import poc_env

from fedseg.controller import ROUND_METRICS_FILE
from fedseg.jobs.recipes import RUN_INFO_FILE, JobSettings, build_recipe
from fedseg.site_config import site_environment

PROJECT_NAME = "fedseg_poc"
# a job whose server process has been gone this long without the job having ended: the server died
SERVER_JOB_GONE_SECONDS = 20
SITES_CONNECT_SECONDS = 180  # for every site to connect before the job is submitted
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
            {
                "name": "server",
                "type": "server",
                "org": "fedseg",
                "default_host": "localhost",
                "fed_learn_port": fed_learn_port,
                "admin_port": admin_port,
            },
            {"name": ADMIN, "type": "admin", "org": "fedseg", "role": "project_admin"},
            *({"name": site, "type": "client", "org": "fedseg"} for site in sites),
        ],
        "builders": [
            {
                "path": "nvflare.lighter.impl.workspace.WorkspaceBuilder",
                "args": {"template_file": ["master_template.yml"]},
            },
            {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
            {"path": "nvflare.lighter.impl.cert.CertBuilder"},
            {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        ],
    }


def allow_fedseg_classes(poc_workspace: str) -> list[str]:
    """Put FedRef-Seg's class allow-list (``fedseg.policy``) into every POC kit's ``local/resources.json``.

    POC kits come with NVFlare's default allow-list, enforced, which refuses a configuration-only job's
    classes (``fedseg.executor.SiteExecutor``, our controllers); a hospital gets ours from
    ``fedseg install-policy``. Returns the files written.
    """
    from fedseg.app.kit_policy import kit_resources, kit_role
    from fedseg.atomic import write_json
    from fedseg.policy import with_allow_list

    written = []
    for startup in sorted(glob.glob(os.path.join(poc_workspace, "**", "startup"), recursive=True)):
        kit = os.path.dirname(startup)
        if not os.path.isdir(os.path.join(kit, "local")):
            continue
        try:
            role = kit_role(kit)
        except ValueError:  # the admin's kit
            continue
        path = os.path.join(kit, "local", "resources.json")
        write_json(path, with_allow_list(kit_resources(kit), role))
        written.append(path)
    return written


def write_server_config(poc_workspace: str, config: dict) -> list[str]:
    """The POC server's ``local/fedseg_server.json`` (its checkpoint store when a run is continued); returns it."""
    from fedseg.app.kit_policy import kit_role
    from fedseg.atomic import write_json
    from fedseg.server_config import SERVER_CONFIG_FILE

    written = []
    for startup in sorted(glob.glob(os.path.join(poc_workspace, "**", "startup"), recursive=True)):
        kit = os.path.dirname(startup)
        try:
            role = kit_role(kit)
        except ValueError:
            continue
        if role == "server" and os.path.isdir(os.path.join(kit, "local")):
            path = os.path.join(kit, "local", SERVER_CONFIG_FILE)
            write_json(path, config)
            written.append(path)
    return written


class FedSegPocEnv(poc_env.PocEnv):
    """NVFlare's ``PocEnv`` whose kits allow-list FedRef-Seg's classes before the federation starts."""

    def deploy(self, job) -> str:
        """``PocEnv.deploy`` (NVFlare 2.9: provision, start, submit) with the allow-list written before the start."""
        if self._check_poc_running():
            self.stop(clean_up=True)
        poc_env.prepare_poc_provision(
            clients=self.clients or [],
            number_of_clients=self.num_clients,
            workspace=self.poc_workspace,
            docker_image=self.docker_image,
            use_he=self.use_he,
            project_conf_path=self.project_conf_path,
            examples_dir=None,
        )
        allow_fedseg_classes(self.poc_workspace)
        write_server_config(self.poc_workspace, getattr(self, "server_config", {}))
        poc_env._start_poc(
            poc_workspace=self.poc_workspace, gpu_ids=self.gpu_ids, excluded=[self.username], services_list=[]
        )
        time.sleep(poc_env.SERVICE_START_TIMEOUT)
        self.wait_for_sites()
        return self._get_session_manager().submit_job(job)

    def wait_for_sites(self, timeout: float = SITES_CONNECT_SECONDS) -> None:
        """Submit only once every site is connected (an operator's ``check_status client``): the job starts as
        soon as min_clients sites are there, and a site that connects later would sit the whole job out."""
        session = self._get_session_manager()._get_session()
        try:
            deadline = time.time() + timeout
            while True:
                with contextlib.redirect_stdout(io.StringIO()):
                    connected = {client.name for client in session.get_system_info().client_info}
                missing = sorted(set(self.clients) - connected)
                if not missing:
                    return
                if time.time() > deadline:
                    raise RuntimeError(
                        f"POC: {', '.join(missing)} did not connect to the server in {timeout:.0f} s "
                        f"(see {self.poc_workspace}/*/{missing[0]}/log.txt)"
                    )
                time.sleep(1)
        finally:
            session.close()


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
    saved_poc_workspace = os.environ.get("NVFLARE_POC_WORKSPACE")
    os.environ["NVFLARE_POC_WORKSPACE"] = poc_workspace
    # the site processes POC starts inherit this environment: each reads its data folder from it
    restore = contextlib.ExitStack()
    restore.enter_context(
        site_environment(
            data_root,
            settings.cache_dir,
            allow_drills=bool(settings.faults),
            allow_scaffold=settings.algorithm == "scaffold",  # POC: the researcher's own machine
        )
    )
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
                    f"  round {first + number + 1}/{first + settings.num_rounds} finished "
                    f"({time.time() - started:.0f} s)",
                    flush=True,
                )
            shown = done
            if finished:
                break
            if time.time() - started > timeout:
                run.abort()
                raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s")
            time.sleep(3)
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
    finally:
        env.stop(clean_up=False)
        left = stop_leftovers(poc_workspace)
        restore.close()  # this process's environment as it was
        if saved_poc_workspace is None:
            os.environ.pop("NVFLARE_POC_WORKSPACE", None)
        else:
            os.environ["NVFLARE_POC_WORKSPACE"] = saved_poc_workspace
        print(f"POC federation stopped{f' ({left} lingering processes ended)' if left else ''}", flush=True)


def server_job_running(poc_workspace: str, job_id: str) -> bool:
    """Whether the server's process for this job is there (it ends with the job, or with a dying server)."""
    return any(
        any(part.endswith("server.runner_process") for part in cmdline) and job_id in cmdline
        for cmdline in (process.info["cmdline"] or [] for process in federation_processes(poc_workspace))
    )


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
