"""A provisioned federation of hospitals on localhost, from the startup kits `make provision` writes from
app/provision/project.yml, with the policies `fedseg install-policy` installs (docs/operations.md).

`make provision` runs twice, the second time after a hospital is added to the project file, as a project
admin does: the second run writes the next set of kits, with the same root CA. The server and site-2
start from the new kits and site-1 from its first one, with mutual TLS. Every site refuses BYOC, enforces
its class allow-list, filters what it sends (PercentilePrivacy) and reads its data folder from its own
kit (the sites' environment names none). One federation serves every test here: the researcher's
configuration-only FedRef job completes and the filter's effect shows in what the server received; a BYOC
job, a job naming a command-running executor and a job built for another version are refused; the
clinician's kit is refused; nothing is left running afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import yaml
from helpers.commands import fedseg, ok
from helpers.commands import provision as provision_project

import fedseg as fedseg_package
from fedseg.app.poc import federation_processes, free_ports, stop_leftovers
from fedseg.data_prep.fets2022 import prepare_sites
from fedseg.jobs.export import export_job
from fedseg.jobs.recipes import JobSettings


def provision(workspace, fed_learn_port: int, admin_port: int, extra_participants: tuple = ()) -> str:
    return provision_project(
        workspace, {"fed_learn_port": fed_learn_port, "admin_port": admin_port}, extra_participants
    )


def test_make_provision_again_after_an_edit_gives_new_kits_with_the_same_root_ca(tmp_path):
    fed_learn_port, admin_port = free_ports(2)
    first = provision(tmp_path, fed_learn_port, admin_port)
    hospital_d = {"name": "site-4", "type": "client", "org": "hospital_d"}
    second = provision(tmp_path, fed_learn_port, admin_port, extra_participants=[hospital_d])
    assert (os.path.basename(first), os.path.basename(second)) == ("prod_00", "prod_01")
    assert os.path.isdir(os.path.join(second, "site-4", "startup")) and not os.path.exists(
        os.path.join(first, "site-4")
    )
    for kit, certificate in (
        ("server", "server.crt"),
        ("site-1", "client.crt"),
        ("researcher@fedseg.org", "client.crt"),
    ):
        for name in ("rootCA.pem", certificate):  # a kit already handed out still works with the new ones
            assert _read(first, kit, name) == _read(second, kit, name), (kit, name)


def _read(prod: str, kit: str, name: str) -> bytes:
    with open(os.path.join(prod, kit, "startup", name), "rb") as f:
        return f.read()


def start_kit(kit: str, env: dict) -> None:
    subprocess.run(
        ["bash", os.path.join(kit, "startup", "start.sh")],
        check=True,
        env=env,
        cwd=kit,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def session(prod: str, user: str):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    with contextlib.redirect_stdout(open(os.devnull, "w")):
        return new_secure_session(user, os.path.join(prod, user), timeout=60)


def connected(sess) -> list[str]:
    return sorted(c.name for c in sess.get_connected_client_list())


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_fets):
    tmp_path = tmp_path_factory.mktemp("hospitals")
    sites = tmp_path / "sites"
    prepare_sites(tiny_fets, str(sites), partitions=[1, 2], validation_fraction=0.34)
    fed_learn_port, admin_port = free_ports(2)
    handed_out = provision(str(tmp_path / "kits"), fed_learn_port, admin_port)
    # provisioned again after an edit: site-1 keeps the kit it was sent, everyone else starts from the new set
    prod = provision(
        str(tmp_path / "kits"),
        fed_learn_port,
        admin_port,
        extra_participants=[{"name": "site-4", "type": "client", "org": "hospital_d"}],
    )
    kits = {
        "server": os.path.join(prod, "server"),
        "site-1": os.path.join(handed_out, "site-1"),
        "site-2": os.path.join(prod, "site-2"),
    }
    # as docs/operations.md writes it: the server's store out of /tmp, each hospital's policy and data folder
    ok(fedseg("install-policy", "server", "--store", str(tmp_path / "store"), cwd=prod))
    for site in ("site-1", "site-2"):
        kit = kits[site]
        ok(fedseg("install-policy", os.path.basename(kit), "--data-root", str(sites), cwd=os.path.dirname(kit)))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("FEDSEG_DATA_ROOT", None)  # each site's own kit says where its data is
    admin = None
    try:
        start_kit(kits["server"], env)
        time.sleep(5)
        start_kit(kits["site-1"], env)
        start_kit(kits["site-2"], env)
        admin = session(prod, "admin@fedseg.org")
        deadline = time.time() + 90
        while connected(admin) != ["site-1", "site-2"] and time.time() < deadline:
            time.sleep(2)
        assert connected(admin) == ["site-1", "site-2"], "sites did not connect to the server"
        yield Federation(prod, admin, env, tmp_path, kits)
    finally:
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.shutdown("all")
        stop_leftovers(str(tmp_path), grace=30)
        assert not federation_processes(str(tmp_path)), "processes left running"


@dataclass
class Federation:
    prod: str
    admin: object
    env: dict
    tmp_path: object
    kits: dict

    def submit(self, job: str, timeout: float = 600) -> tuple[str, dict]:
        """The researcher submits ``job`` and waits for it to end; returns (job id, job meta)."""
        return self.submit_all([job], timeout)[0]

    def submit_all(self, jobs: list[str], timeout: float = 600) -> list[tuple[str, dict]]:
        """The researcher submits ``jobs`` at once (FLARE runs up to the server's max_jobs together) and waits
        for each to end; returns (job id, job meta) of each."""
        researcher = session(self.prod, "researcher@fedseg.org")
        try:
            ids, ended = [researcher.submit_job(job) for job in jobs], []
            for job_id in ids:
                _, meta = researcher.monitor_job_and_return_job_meta(job_id, timeout=timeout, poll_interval=2)
                # what the researcher may download: the server's workspace of the job (FLARE moves it into its
                # job store when the job ends), with the server's job log; a job refused at deployment has none
                with contextlib.suppress(Exception):
                    meta["download"] = researcher.download_job_result(job_id)
                ended.append((job_id, meta))
            return ended
        finally:
            researcher.close()

    def site_log(self, site: str, job_id: str) -> str:
        """The job's log on ``site``, empty if it never started there."""
        return _read_text(os.path.join(self.kits[site], job_id, "log.txt"))

    @staticmethod
    def server_log(meta: dict) -> str:
        """The server's log of a finished job, from the researcher's download of it."""
        return _read_text(os.path.join(meta.get("download") or "", "workspace", "log.txt"))

    def export(self, name: str, **settings) -> str:
        return export_job(
            JobSettings(algorithm="fedref", name=name, **TINY_JOB, **settings), str(self.tmp_path / "jobs" / name)
        )


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


# dead_site_seconds: a job that every site refuses ends in seconds, not after FLARE's default minute
TINY_JOB = dict(
    sites=["site-1", "site-2"],
    num_rounds=2,
    local_epochs=1,
    crop=(32, 32, 24),
    channels=(8, 16, 32),
    threads=1,
    dead_site_seconds=10,
)


def edit_client_config(job: str, change, side: str = "client") -> None:
    path = os.path.join(job, "app", "config", f"config_fed_{side}.json")
    with open(path) as f:
        config = json.load(f)
    change(config)
    with open(path, "w") as f:
        json.dump(config, f)


def test_config_only_fedref_job_completes_and_the_servers_records_show_the_privacy_filter(federation):
    job_id, meta = federation.submit(federation.export("fedref"))
    assert meta["status"] == "FINISHED:COMPLETED", meta
    metrics = [
        os.path.join(d, "round_metrics.jsonl")
        for d, _, files in os.walk(meta["download"])
        if "round_metrics.jsonl" in files
    ]
    rounds = [json.loads(line) for line in open(sorted(metrics, key=len)[0])]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["global_updated"] for r in rounds)
    for record in rounds:  # PercentilePrivacy(percentile=10) zeroes a tenth of each update; training zeroes none
        assert sorted(record["sites"]) == ["site-1", "site-2"]
        for site in record["sites"].values():
            assert 0.095 <= site["update_zero_fraction"] <= 0.2, site
    # the job went to the store the project admin chose, not to /tmp
    assert os.path.isdir(federation.tmp_path / "store" / "jobs-storage" / job_id)
    # what a site logs (and could stream to the server) names no patient and no folder of the hospital's
    for site in ("site-1", "site-2"):
        log = federation.site_log(site, job_id)
        assert "round 1" in log and "FeTS2022_" not in log and str(federation.tmp_path / "sites") not in log, site

    # the run goes on as a new job that names it by its id: the server finds its checkpoints in its own store
    resumed = export_job(
        JobSettings(algorithm="fedref", name="fedref_resumed", **{**TINY_JOB, "num_rounds": 1}, resume_job=job_id),
        str(federation.tmp_path / "jobs" / "fedref_resumed"),
    )
    # ... and asks, as NVFlare's own cross-site evaluation does, for every site's local model: no site sends it
    _server_workflow(
        resumed, "controller1", lambda evaluation: evaluation["args"].update(submit_model_task_name="submit_model")
    )
    resumed_id, meta = federation.submit(resumed)
    assert meta["status"] == "FINISHED:COMPLETED", meta
    for site in ("site-1", "site-2"):
        assert f"{site} does not share its local model" in federation.site_log(site, resumed_id)
    (results,) = [
        os.path.join(d, f) for d, _, files in os.walk(meta["download"]) for f in files if f == "cross_val_results.json"
    ]
    scored = json.load(open(results))  # the server's models only (SRV_...), on both sites
    assert sorted(scored) == ["site-1", "site-2"], scored
    assert all(name.startswith("SRV_") for models in scored.values() for name in models), scored


def test_a_byoc_job_is_refused_by_the_server_before_any_site_receives_it(federation):
    _, meta = federation.submit(federation.export("byoc", byoc=True), timeout=180)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN", meta
    # the server's own policy (install-policy server) refuses code too: the job never reaches a hospital
    assert meta["job_deploy_detail"] == ["server: BYOC not permitted"], meta["job_deploy_detail"]


def test_a_job_naming_a_command_running_executor_is_refused_by_the_allow_list(federation):
    marker = federation.tmp_path / "the_job_ran_a_command"
    job = federation.export("external_command")
    ran_anything = {
        "path": "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
        "args": {"execution_mode": "external_process", "command": f"touch {marker}"},
    }
    edit_client_config(job, lambda config: config["executors"][0].update(executor=ran_anything))
    job_id, meta = federation.submit(job, timeout=180)
    assert meta["status"] != "FINISHED:COMPLETED", meta
    assert not marker.exists()
    for site in ("site-1", "site-2"):
        assert re.search(
            r"ClientAPIExecutor' at config path 'executors\.#\d+\.executor' is not in allow_list",
            federation.site_log(site, job_id),
        ), site


def test_a_job_built_for_another_version_is_refused_with_both_versions(federation):
    job = federation.export("other_version")
    edit_client_config(job, lambda config: config["executors"][0]["executor"]["args"].update(package_version="0.0.1"))
    job_id, meta = federation.submit(job, timeout=180)
    assert meta["status"] != "FINISHED:COMPLETED", meta
    expected = (
        f"this site refuses the job: it was built for fedref-seg 0.0.1 and this machine has fedref-seg "
        f"{fedseg_package.__version__} installed"
    )
    assert expected in federation.site_log("site-1", job_id)


def test_roles_and_certificates(federation):
    job = federation.export("clinician")
    # the clinician (member) may look but not submit
    clinician = session(federation.prod, "clinician@hospital-a.org")
    with pytest.raises(Exception, match="(?i)not authorized|authoriz"):
        clinician.submit_job(job)
    clinician.close()
    # (a site from another provisioning, refused by TLS: tests/integration/test_hospitals.py)


def _ports(prod: str) -> tuple[int, int]:
    with open(os.path.join(os.path.dirname(prod), "..", "project.yml")) as f:
        server = next(p for p in yaml.safe_load(f)["participants"] if p["type"] == "server")
    return server["fed_learn_port"], server["admin_port"]


def test_hospital_it_aborts_a_researchers_running_job_from_its_admin_kit(federation):
    job = export_job(
        JobSettings(algorithm="fedref", name="long", **{**TINY_JOB, "num_rounds": 50}),
        str(federation.tmp_path / "jobs" / "long"),
    )
    researcher = session(federation.prod, "researcher@fedseg.org")
    it_a = session(federation.prod, "it@hospital-a.org")
    clinician = session(federation.prod, "clinician@hospital-a.org")
    try:
        job_id = researcher.submit_job(job)
        deadline = time.time() + 120
        while researcher.get_job_meta(job_id)["status"] != "RUNNING" and time.time() < deadline:
            time.sleep(1)
        assert researcher.get_job_meta(job_id)["status"] == "RUNNING"
        with pytest.raises(Exception, match="(?i)not authorized"):
            clinician.abort_job(job_id)  # a member only looks
        it_a.abort_job(job_id)  # hospital IT stops it (docs/operations.md)
        _, meta = researcher.monitor_job_and_return_job_meta(job_id, timeout=180, poll_interval=2)
        assert meta["status"] == "FINISHED:ABORTED", meta
        with pytest.raises(Exception, match="(?i)not authorized"):
            it_a.delete_job(job_id)  # stopping it is all: the researcher's job stays the researcher's
        # the sites are back to idle, ready for the next job
        assert not [p for p in federation_processes(str(federation.tmp_path)) if job_id in " ".join(p.cmdline())]
    finally:
        for s in (researcher, it_a, clinician):
            s.close()


# -- a hostile researcher (the lead) tries for more than the hospitals and the server allow (issue 21) --------


class RunsCodeWhenUnpickled:
    """A pickle that creates ``marker`` when it is loaded with ``torch.load(weights_only=False)``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _server_workflow(job: str, workflow_id: str, change) -> None:
    edit_client_config(job, lambda c: change(next(w for w in c["workflows"] if w["id"] == workflow_id)), "server")


def _server_controller(job: str, change) -> None:
    _server_workflow(job, "controller", change)


def test_a_pickle_beside_the_configs_is_refused_at_deployment_and_never_loaded(federation):
    import torch

    marker = federation.tmp_path / "pickle_ran_on_the_server"
    job = federation.export("pickle")
    torch.save(RunsCodeWhenUnpickled(marker), os.path.join(job, "app", "config", "buffer.pt"))
    _, meta = federation.submit(job, timeout=180)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN", meta
    assert "its app holds config/buffer.pt" in str(meta["job_deploy_detail"]), meta["job_deploy_detail"]
    assert not marker.exists()


def test_a_job_naming_a_file_for_the_persistor_is_refused_by_the_allow_list(federation):
    import torch

    marker = federation.tmp_path / "persistor_pickle_ran"
    planted = federation.tmp_path / "reachable_on_the_server.pt"  # any file the server user can read
    torch.save(RunsCodeWhenUnpickled(marker), planted)
    job = federation.export("persistor_path")

    def old_persistor(config):
        (persistor,) = [c for c in config["components"] if c["id"] == "persistor"]
        persistor.update(
            path="nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
            args={"source_ckpt_file_full_name": str(planted), "load_weights_only": False},
        )

    edit_client_config(job, old_persistor, "server")
    job_id, meta = federation.submit(job, timeout=180)
    assert meta["status"] != "FINISHED:COMPLETED", meta
    assert "PTFileModelPersistor' at config path" in federation.server_log(meta)
    assert "is not in allow_list" in federation.server_log(meta)
    assert not marker.exists()


SERVER_REFUSALS = {  # a path: refused when the workflow is built; over a cap: when it starts
    "metrics_filename": ("ABSOLUTE", "must be a plain name"),
    "num_rounds": (5000, "num_rounds = 5000 exceeds the server's cap max_rounds = 1000"),
}


@pytest.fixture(scope="module")
def server_refusals(federation) -> dict:
    """The jobs of SERVER_REFUSALS, submitted together: setting -> (job id, meta)."""
    outside = federation.tmp_path / "written_outside_the_workspace.jsonl"
    jobs = []
    for setting, (value, _) in SERVER_REFUSALS.items():
        job = federation.export(f"server_{setting}")
        value = str(outside) if value == "ABSOLUTE" else value
        _server_controller(job, lambda controller, s=setting, v=value: controller["args"].update({s: v}))
        jobs.append(job)
    return dict(zip(SERVER_REFUSALS, federation.submit_all(jobs, timeout=180)))


@pytest.mark.parametrize("setting", list(SERVER_REFUSALS))
def test_the_server_refuses_paths_and_settings_over_its_caps_before_any_round(federation, server_refusals, setting):
    expected = SERVER_REFUSALS[setting][1]
    job_id, meta = server_refusals[setting]
    assert meta["status"] != "FINISHED:COMPLETED", meta
    assert expected in federation.server_log(meta)
    assert not (federation.tmp_path / "written_outside_the_workspace.jsonl").exists()
    assert "round 0" not in federation.site_log("site-1", job_id)  # no site trained


SITE_REFUSALS = {
    "secret": ({"lr": "${secret:file:SECRET}"}, "refuses the job: training setting lr '${secret:file:"),
    "over-cap": (
        {"local_steps": 10**9},
        "refuses the job: local_steps 1000000000 is over this site's cap max_local_steps",
    ),
    "one-patient-validation": (
        {"val_max_cases": 1},
        "refuses the job: val_max_cases 1 is under this site's minimum min_val_cases",
    ),
}


@pytest.fixture(scope="module")
def site_refusals(federation) -> dict:
    """The three jobs of SITE_REFUSALS, submitted together (they run side by side): case -> (job id, meta)."""
    secret = federation.tmp_path / "hospital_secret.txt"
    secret.write_text("TOKEN-4f1c9e-HOSPITAL-ONLY")
    jobs = []
    for change, _ in SITE_REFUSALS.values():
        change = {k: v.replace("SECRET", str(secret)) if isinstance(v, str) else v for k, v in change.items()}
        job = federation.export(f"site_{'_'.join(change)}")
        edit_client_config(
            job, lambda config, c=change: config["executors"][0]["executor"]["args"]["training"].update(c)
        )
        jobs.append(job)
    return dict(zip(SITE_REFUSALS, federation.submit_all(jobs, timeout=300)))


@pytest.mark.parametrize("case", list(SITE_REFUSALS))
def test_every_site_refuses_training_settings_it_did_not_allow(federation, site_refusals, case):
    expected = SITE_REFUSALS[case][1]
    job_id, meta = site_refusals[case]
    assert meta["status"] != "FINISHED:COMPLETED", meta
    for site in ("site-1", "site-2"):
        log = federation.site_log(site, job_id)
        assert f"{site} {expected}" in log, (site, log[-2000:])
        assert "global model dice_mean" not in log  # nothing was trained or validated
    # the secret's content reached no log, on the sites or the server
    for path in federation.tmp_path.rglob("log*.txt"):
        assert "TOKEN-4f1c9e" not in path.read_text(errors="replace"), path
