"""FedRef-Seg across hospitals on separate network hosts: the server, three hospitals and the researcher's laptop
each in their own network namespace (``fedseg testbed``), with their own address and host name; each hospital's
link shaped to 20 Mbit/s. The kits are the ones `make provision` writes from app/provision/project.yml with the
server's host name set (its certificate names ``server.fedseg.test``; the sites reach it by that name), with the
policies `fedseg install-policy` installs; the researcher submits configuration-only jobs from the admin host
through the FLARE API.

One federation serves every test here, in file order:

- the hospitals start before the server: they wait, retry and join once it is up;
- a site kit that reaches the server under a name the server's certificate does not carry (its address), and a
  site provisioned by another project, never join;
- a FedRef job with the ``fets2022`` profile's network (9.6 MB a model) completes over the 20 Mbit/s links while
  one hospital's link is cut for longer than a round: the round records show the bytes each way and the rounds
  that missed the site, the report names them, and the site trains again in the same job once it is back;
  then another hospital's job process is killed (SIGKILL): the job still completes with the two others, and
  the last round's record and the report list that site as missing (this replaced the POC drill of it);
- the server host dies (every process on it killed) in the middle of a run; once the server kit is started
  again, ``fedseg resume <job id>`` from the researcher's kit continues the run from its last recorded round with
  FedRef's reference buffer, round numbers going on, until the planned rounds are done, and the report of the
  continued run covers the rounds of both parts.

Teardown removes every namespace, link and process the testbed made. Without root the module is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import pytest
from helpers.commands import fedseg, ok, provision

from fedseg.app import testbed as testbeds
from fedseg.app.testbed_federation import AdminAgent, server_records, start_kit
from fedseg.data_prep.fets2022 import prepare_sites
from fedseg.jobs.export import export_job
from fedseg.jobs.recipes import JobSettings

pytestmark = pytest.mark.skipif(testbeds.can_run() is not None, reason=f"testbed: {testbeds.can_run()}")

SITES = ["site-1", "site-2", "site-3"]
UPLINK = "20mbit"
SERVER_NAME = f"server.{testbeds.DOMAIN}"
RESEARCHER = "researcher@fedseg.org"
ROGUE_SITE = "site-4"  # in the project, but its kit is pointed at the server's address instead of its name
FOREIGN_SITE = "site-9"  # provisioned by another project (another root CA)
# the fets2022 profile's network and links; a few small crops a round so 2 CPU cores keep up
JOB = dict(
    sites=SITES,
    local_steps=2,
    samples_per_case=1,
    crop=(32, 32, 24),
    sw_batch_size=1,
    threads=1,
    cross_site_eval=False,
    wait_after_min_seconds=5,
    dead_site_seconds=120,
)


@dataclass
class Hospitals:
    testbed: testbeds.Testbed
    prod: str
    kits: dict
    env: dict
    tmp_path: object
    agent: AdminAgent

    def admin(self, op: str, **args):
        """One FLARE API call on the admin host (as the researcher unless ``user`` is given)."""
        return self.agent.call(op, **args)

    def start(self, host: str, kit: str) -> None:
        start_kit(self.testbed, host, kit, self.env)

    def connected(self) -> list[str]:
        return self.admin("connected", user="admin@fedseg.org")

    def wait_connected(self, sites: list[str], timeout: float = 120) -> list[str]:
        return self.agent.wait_connected(sites, timeout, user="admin@fedseg.org")

    def export(self, name: str, **settings) -> str:
        job = replace(JobSettings.for_profile("fets2022", algorithm="fedref", **{**JOB, **settings}), name=name)
        return export_job(job, str(self.tmp_path / "jobs" / name))

    def server_records(self, job_id: str) -> list[dict]:
        return server_records(self.kits["server"], job_id)

    def log(self, kit: str) -> str:
        path = os.path.join(kit, "log.txt")
        if not os.path.isfile(path):
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


def _edit_json(path: str, change) -> None:
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def point_at(kit: str, host: str) -> None:
    """Make a site kit connect to ``host`` instead of the server name it was provisioned with."""
    _edit_json(
        os.path.join(kit, "startup", "fed_client.json"),
        lambda c: c["servers"][0]["service"].update(target=f"{host}:8002"),
    )


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory, tiny_fets):
    tmp_path = tmp_path_factory.mktemp("hospitals_net")
    sites = tmp_path / "sites"
    prepare_sites(tiny_fets, str(sites), partitions=[1, 2, 3], validation_fraction=0.34)
    prod = provision(
        str(tmp_path / "kits"),
        {"default_host": SERVER_NAME},
        extra_participants=[{"name": ROGUE_SITE, "type": "client", "org": "hospital_d"}],
    )
    foreign = provision(
        str(tmp_path / "foreign"),
        {"default_host": SERVER_NAME},
        extra_participants=[{"name": FOREIGN_SITE, "type": "client", "org": "hospital_z"}],
        name="another_project",
    )
    kits = {name: os.path.join(prod, name) for name in ("server", *SITES, ROGUE_SITE)}
    kits[FOREIGN_SITE] = os.path.join(foreign, FOREIGN_SITE)
    ok(fedseg("install-policy", "server", "--store", str(tmp_path / "store"), cwd=prod))
    for outsider in (ROGUE_SITE, FOREIGN_SITE):  # data of their own, so that only the network can stop them
        shutil.copytree(sites / "site-1", sites / outsider)
    for site in (*SITES, ROGUE_SITE, FOREIGN_SITE):
        kit = kits[site]
        ok(fedseg("install-policy", site, "--data-root", str(sites), cwd=os.path.dirname(kit)))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("FEDSEG_DATA_ROOT", None)
    hosts = ["server", *SITES, "rogue", "foreign", "admin"]
    with testbeds.testbed("fsgh", hosts, rates={site: UPLINK for site in SITES}) as testbed:
        server_address = testbed.host("server").address
        # the rogue kit is pointed at the server's address, not at the name the server's certificate carries
        point_at(kits[ROGUE_SITE], server_address)
        agent = AdminAgent(testbed, "admin", prod, env, str(tmp_path / "admin_agent.log"), RESEARCHER)
        federation = Hospitals(testbed, prod, kits, env, tmp_path, agent)
        try:
            for site in SITES:  # before the server: they retry until it is up
                federation.start(site, kits[site])
            federation.start("rogue", kits[ROGUE_SITE])
            federation.start("foreign", kits[FOREIGN_SITE])
            time.sleep(6)
            federation.start("server", kits["server"])
            yield federation
        finally:
            agent.close()
    assert not [h for h in hosts if os.path.exists(f"/run/netns/fsgh-{h}")], "namespaces left behind"


def test_hospitals_started_before_the_server_join_it_and_a_foreign_site_does_not(hospitals):
    joined = hospitals.wait_connected([*SITES, ROGUE_SITE])
    assert set(SITES) <= set(joined), f"the hospitals did not join the server they waited for: {joined}"
    # a site of another project: its kit trusts another root CA, and the TLS handshake fails both ways
    assert FOREIGN_SITE not in joined
    assert "CERTIFICATE_VERIFY_FAILED" in hospitals.log(hospitals.kits[FOREIGN_SITE])
    # NVFlare binds a site to its key and certificate (and the server to its identity, "server"), not to a host
    # name or address: a project's site kit started on another host, reaching the server by its address, joins.
    # What keeps a kit to its hospital's machine is its private key and the server's firewall (docs/operations.md).
    assert ROGUE_SITE in joined
    rogue = hospitals.testbed.host("rogue").address
    assert f"<= {rogue}:" in hospitals.log(hospitals.kits["server"])
    hospitals.testbed.kill_host("rogue")


def _wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _downloaded_records(folder: str) -> list[dict]:
    paths = sorted(
        (os.path.join(d, "round_metrics.jsonl") for d, _, files in os.walk(folder) if "round_metrics.jsonl" in files),
        key=len,
    )
    with open(paths[0], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def site_job_process(hospitals, site: str):
    """The job (worker) process on ``site``'s host, or None."""
    import psutil

    for pid in hospitals.testbed.processes().get(site, []):
        with contextlib.suppress(psutil.NoSuchProcess):
            if any(part.endswith("worker_process") for part in psutil.Process(pid).cmdline()):
                return psutil.Process(pid)
    return None


def test_a_fedref_job_over_20_mbit_links_goes_on_through_a_cut_link_and_a_killed_site(hospitals):
    """site-3's link is cut for longer than a round and comes back; later site-2's job process is killed (the
    OOM killer, a reboot): the job completes with the sites it has, and the records and report say who missed
    which round."""
    rounds, cut, killed = 6, "site-3", "site-2"
    job_id = hospitals.admin("submit", job=hospitals.export("fedref_links", num_rounds=rounds))
    records = _wait_for(
        lambda: len(hospitals.server_records(job_id)) >= 2 and hospitals.server_records(job_id), 600, "round 1"
    )
    round_seconds = max(r["seconds"] for r in records)
    hospitals.testbed.set_link(cut, up=False)  # the hospital's VPN drops
    cut_at = time.time()
    _wait_for(lambda: len(hospitals.server_records(job_id)) >= len(records) + 1, 600, "a round without the site")
    time.sleep(max(0.0, 1.5 * round_seconds - (time.time() - cut_at)))
    hospitals.testbed.set_link(cut, up=True)
    outage = time.time() - cut_at
    back = _wait_for(
        lambda: [r for r in hospitals.server_records(job_id)[len(records) + 1 :] if cut in r["sites"]], 600, "site-3"
    )
    assert back[0]["round"] < rounds - 1, "no round left after the site came back"
    site_job_process(hospitals, killed).kill()
    killed_after = len(hospitals.server_records(job_id))

    meta = hospitals.admin("wait", job_id=job_id, timeout=900)
    assert meta["status"] == "FINISHED:COMPLETED", meta  # a killed site's job process does not fail the job
    download = hospitals.admin("download", job_id=job_id, destination=str(hospitals.tmp_path / "download"))
    records = _downloaded_records(download)
    assert [r["round"] for r in records] == list(range(rounds)) and all(r["global_updated"] for r in records)
    assert outage > round_seconds
    missed = [r["round"] for r in records if cut in r["missing"]]
    assert missed, "no round missed the cut-off site"
    # the site trained before the cut and trains again in the same job once its link is back
    assert cut in records[0]["sites"] and cut in records[-1]["sites"], [sorted(r["sites"]) for r in records]
    assert killed in records[killed_after - 1]["sites"] and killed in records[-1]["missing"]
    for record in records:  # bytes each way, per site: the fets2022 network is 9.6 MB a model
        for site, answer in record["sites"].items():
            assert answer["bytes_received_by_site"] > 9e6 and answer["bytes_sent_by_site"] > 9e6, (site, answer)
    report = ok(
        fedseg("report", download, "--out", str(hospitals.tmp_path / "report_links"), cwd=str(hospitals.tmp_path))
    )
    summary = json.loads((hospitals.tmp_path / "report_links" / "summary.json").read_text())
    assert {e["round"] for e in summary["events"] if e["site"] == cut and "missing" in e["what"]} == set(missed)
    assert rounds - 1 in {e["round"] for e in summary["events"] if e["site"] == killed and "missing" in e["what"]}
    page = (hospitals.tmp_path / "report_links" / "index.html").read_text()
    assert f"{cut}: no result (site missing)" in page and f"{killed}: no result (site missing)" in page
    assert "report: " in report


def test_a_dead_server_host_and_fedseg_resume_finish_the_planned_rounds(hospitals):
    rounds = 3
    job_id = hospitals.admin("submit", job=hospitals.export("fedref_crash", num_rounds=rounds))
    _wait_for(lambda: hospitals.server_records(job_id), 600, "round 0")
    hospitals.testbed.kill_host("server")  # the server's machine dies: every process on it, no warning
    done = len(hospitals.server_records(job_id))
    assert 1 <= done < rounds
    hospitals.start("server", hospitals.kits["server"])  # the operator starts the server kit again
    assert set(SITES) <= set(hospitals.wait_connected(SITES, timeout=180)), "the hospitals did not come back"

    # the researcher continues the run from the admin host, with the README's command
    command = ["fedseg", "resume", job_id, "--startup-kit", os.path.join(hospitals.prod, RESEARCHER), "--wait"]
    resumed = hospitals.testbed.run(
        "admin", command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, env=hospitals.env
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    (submitted,) = [line for line in resumed.stdout.splitlines() if line.startswith("submitted job ")]
    assert f"continues {job_id} up to {rounds} rounds in all" in submitted
    new_id = submitted.split()[2]
    assert f"job {new_id}: FINISHED:COMPLETED" in resumed.stdout

    download = hospitals.admin("download", job_id=new_id, destination=str(hospitals.tmp_path / "download_resumed"))
    records = _downloaded_records(download)
    assert [r["round"] for r in records] == list(range(done, rounds))  # round numbers go on
    # the buffer came back: the initial model and one per round done (a fresh one would hold 2)
    assert records[0]["fedref"]["buffer"] == min(records[0]["fedref"]["p"], done + 2) > 2
    out = hospitals.tmp_path / "report_resumed"
    ok(fedseg("report", download, "--out", str(out), cwd=str(hospitals.tmp_path)))
    summary = json.loads((out / "summary.json").read_text())
    assert [point["round"] for point in summary["curves"]] == list(range(rounds))  # both parts
    assert f"from job {job_id}, continued as this job from round {done}" in (out / "index.html").read_text()
