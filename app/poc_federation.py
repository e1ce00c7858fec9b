"""The POC federation on this machine: its ``project.yml`` (sites named after the prepared partitions, ports
picked free), its kits (FedRef-Seg's class allow-list, the server's config), NVFlare's ``PocEnv`` that provisions,
starts it and submits the job once every site is connected, and the processes it runs.

The run itself (rounds, result, verdict) is ``fedseg.app.poc``.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import socket
import time

from nvflare.recipe import poc_env

PROJECT_NAME = "fedseg_poc"
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
        """``PocEnv.deploy`` (NVFlare 2.9: check the job's scripts, provision, start, submit) with the allow-list
        and the server's config written between provisioning and starting; ``tests/unit/test_nvflare_surface.py``
        checks that it makes every call NVFlare's does, in the same order."""
        non_local_scripts = poc_env.collect_non_local_scripts(job)  # none in ours: the job is configuration only
        if non_local_scripts:
            raise ValueError(
                f"The following scripts do not exist locally: {non_local_scripts}. "
                f"For PocEnv, all scripts must be present on the local machine."
            )
        if self._check_poc_running():
            self.stop(clean_up=True)
        self.logger.info("Preparing and starting fresh POC services...")
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
        self.logger.info("POC services started successfully")
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


def server_job_running(poc_workspace: str, job_id: str) -> bool:
    """Whether the server's process for this job is there (it ends with the job, or with a dying server)."""
    return any(
        any(part.endswith("server.runner_process") for part in cmdline) and job_id in cmdline
        for cmdline in (process.info["cmdline"] or [] for process in federation_processes(poc_workspace))
    )


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
