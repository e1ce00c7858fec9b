"""A provisioned federation on localhost, from the startup kits `make provision` writes from
app/provision/project.yml.

`make provision` runs twice, the second time after a hospital is added to the project file, as a project
admin does: the second run writes the next set of kits, with the same root CA. The server and site-2
start from the new kits and site-1 from its first one, with mutual TLS; the researcher's kit submits the FedRef job and it completes; the
clinician's kit is refused; a site whose certificate comes from another provisioning cannot join; nothing
is left running afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import pytest
import yaml

from fedseg.app.poc import federation_processes, free_ports, stop_leftovers
from commands import make, ok
from fedseg.data_prep.fets2022 import prepare_sites
from fedseg.jobs.export import export_job
from fedseg.jobs.recipes import REPO_ROOT, JobSettings

pytestmark = pytest.mark.integration

PROJECT = os.path.join(REPO_ROOT, "app", "provision", "project.yml")


def provision(workspace, fed_learn_port: int, admin_port: int, extra_participants: tuple = ()) -> str:
    """`make provision` of the committed project.yml with free ports (and any participants added);
    returns the kits' folder the command prints."""
    with open(PROJECT) as f:
        project = yaml.safe_load(f)
    for participant in project["participants"]:
        if participant["type"] == "server":
            participant["fed_learn_port"], participant["admin_port"] = fed_learn_port, admin_port
    project["participants"] += list(extra_participants)
    os.makedirs(workspace, exist_ok=True)
    path = os.path.join(workspace, "project.yml")
    with open(path, "w") as f:
        yaml.safe_dump(project, f, sort_keys=False)
    output = ok(make("provision", PROJECT_YML=path, PROVISION_DIR=str(workspace), timeout=120))
    (kits,) = [line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("startup kits: ")]
    return kits.rstrip("/")


def test_make_provision_again_after_an_edit_gives_new_kits_with_the_same_root_ca(tmp_path):
    fed_learn_port, admin_port = free_ports(2)
    first = provision(tmp_path, fed_learn_port, admin_port)
    hospital_d = {"name": "site-4", "type": "client", "org": "hospital_d"}
    second = provision(tmp_path, fed_learn_port, admin_port, extra_participants=[hospital_d])
    assert (os.path.basename(first), os.path.basename(second)) == ("prod_00", "prod_01")
    assert os.path.isdir(os.path.join(second, "site-4", "startup")) and not os.path.exists(os.path.join(first, "site-4"))
    for kit, certificate in (("server", "server.crt"), ("site-1", "client.crt"), ("researcher@fedseg.org", "client.crt")):
        for name in ("rootCA.pem", certificate):  # a kit already handed out still works with the new ones
            assert _read(first, kit, name) == _read(second, kit, name), (kit, name)


def _read(prod: str, kit: str, name: str) -> bytes:
    with open(os.path.join(prod, kit, "startup", name), "rb") as f:
        return f.read()


def start_kit(kit: str, env: dict) -> None:
    subprocess.run(["bash", os.path.join(kit, "startup", "start.sh")], check=True, env=env, cwd=kit,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def session(prod: str, user: str):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    with contextlib.redirect_stdout(open(os.devnull, "w")):
        return new_secure_session(user, os.path.join(prod, user), timeout=60)


def connected(sess) -> list[str]:
    return sorted(c.name for c in sess.get_connected_client_list())


@pytest.fixture
def federation(tmp_path, tiny_fets):
    sites = tmp_path / "sites"
    prepare_sites(tiny_fets, str(sites), partitions=[1, 2], validation_fraction=0.34)
    fed_learn_port, admin_port = free_ports(2)
    handed_out = provision(str(tmp_path / "kits"), fed_learn_port, admin_port)
    # provisioned again after an edit: site-1 keeps the kit it was sent, everyone else starts from the new set
    prod = provision(str(tmp_path / "kits"), fed_learn_port, admin_port,
                     extra_participants=[{"name": "site-4", "type": "client", "org": "hospital_d"}])
    env = dict(os.environ, FEDSEG_DATA_ROOT=str(sites),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    admin = None
    try:
        start_kit(os.path.join(prod, "server"), env)
        time.sleep(5)
        start_kit(os.path.join(handed_out, "site-1"), env)
        start_kit(os.path.join(prod, "site-2"), env)
        admin = session(prod, "admin@fedseg.org")
        deadline = time.time() + 90
        while connected(admin) != ["site-1", "site-2"] and time.time() < deadline:
            time.sleep(2)
        assert connected(admin) == ["site-1", "site-2"], "sites did not connect to the server"
        yield prod, admin, env, tmp_path
    finally:
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.shutdown("all")
        stop_leftovers(str(tmp_path), grace=30)


def test_provisioned_federation_roles_and_certificates(federation):
    prod, admin, env, tmp_path = federation
    job = export_job(JobSettings(algorithm="fedref", sites=["site-1", "site-2"], num_rounds=2, local_epochs=1,
                                 crop=(32, 32, 24), channels=(8, 16, 32), threads=1), str(tmp_path))

    # the clinician (member) may look but not submit
    clinician = session(prod, "clinician@hospital-a.org")
    with pytest.raises(Exception, match="(?i)not authorized|authoriz"):
        clinician.submit_job(job)
    clinician.close()

    # the researcher (lead) submits the job with its custom code; it runs to completion
    researcher = session(prod, "researcher@fedseg.org")
    job_id = researcher.submit_job(job)
    code, meta = researcher.monitor_job_and_return_job_meta(job_id, timeout=600, poll_interval=3)
    assert meta["status"] == "FINISHED:COMPLETED", meta
    result = researcher.download_job_result(job_id)
    researcher.close()
    metrics = [os.path.join(d, "round_metrics.jsonl") for d, _, files in os.walk(result) if "round_metrics.jsonl" in files]
    assert metrics and sum(1 for _ in open(metrics[0])) == 2

    # a site from another provisioning (another root CA) cannot join
    rogue_prod = provision(str(tmp_path / "rogue"), *_ports(prod))
    start_kit(os.path.join(rogue_prod, "site-3"), env)
    time.sleep(15)
    assert connected(admin) == ["site-1", "site-2"]
    assert federation_processes(str(tmp_path / "rogue"))  # it did start, and was refused


def _ports(prod: str) -> tuple[int, int]:
    with open(os.path.join(os.path.dirname(prod), "..", "project.yml")) as f:
        server = next(p for p in yaml.safe_load(f)["participants"] if p["type"] == "server")
    return server["fed_learn_port"], server["admin_port"]
