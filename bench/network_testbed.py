"""The federation behind ``bench.network``: data, kits, the testbed's hosts and one job per link setting.

Everything that needs root and network namespaces is here, apart from the arithmetic on what it records
(``bench.network``): the synthetic sites and provisioned kits with their policies, the federation started
kit by kit on the testbed's hosts, and one job over links shaped to a rate, followed round by round with
the bytes each hospital's link carried.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace

from bench.common import institutions
from fedseg.settings import DEFAULT_SITES

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(REPO_ROOT, "app", "provision", "project.yml")
TESTBED = "fsgbn"  # the tests use fsgh
SITES = list(DEFAULT_SITES)  # the three hospitals of fedseg.settings
HOSTS = ["server", *SITES, "admin"]
ADMIN = "admin@fedseg.org"
RESEARCHER = "researcher@fedseg.org"
UNLIMITED = "unlimited"
PRECISIONS = {"full": None, "float16": "float16"}
SHAPE = (32, 32, 24)
INSTITUTIONS = [  # tests/conftest.py's tiny data: 4, 3 and 3 subjects, differing as the demo's sites do
    (4, 1000.0, 0.10, 0.03, (24, 34)),
    (3, 400.0, 0.25, 0.05, (20, 30)),
    (3, 2500.0, 0.15, 0.04, (28, 38)),
]
# the fets2022 profile's network; compute cut so that the transfer shows (tests/integration/test_hospitals.py's job)
JOB = dict(
    sites=SITES,
    local_steps=2,
    samples_per_case=1,
    crop=SHAPE,
    sw_batch_size=1,
    threads=1,
    cross_site_eval=False,
    wait_after_min_seconds=5,
)


# -- what a job leaves behind (unit-tested in tests/unit/test_bench_summaries.py) ---------------------------
def round_figures(record: dict) -> dict:
    """One round record: its seconds, the slowest site's own work, and the bytes each way per site."""
    sites = record.get("sites", {})
    work = {s: (m.get("train_seconds") or 0.0) + (m.get("val_seconds") or 0.0) for s, m in sites.items()}
    slowest = max(work.values()) if work else 0.0
    return {
        "round": record["round"],
        "seconds": record["seconds"],
        "slowest_site_seconds": slowest,
        "rest_seconds": record["seconds"] - slowest,
        "missing": sorted(set(record.get("missing", [])) | set(record.get("rejected", {}))),
        "bytes_received_by_site": {s: m.get("bytes_received_by_site") for s, m in sorted(sites.items())},
        "bytes_sent_by_site": {s: m.get("bytes_sent_by_site") for s, m in sorted(sites.items())},
    }


FLARE_DOWNLOAD = re.compile(r"\[client\] download ref=\S+ done: elapsed=([\d.]+)s .*\(([\d,]+) bytes\)")
FLARE_UPLOAD = re.compile(r"\[server\] download tx \S+ done: status=finished elapsed=([\d.]+)s .*\(([\d,]+) bytes\)")
MODEL_SIZED = 10**6  # bytes: the model's transfers, not FLARE's small messages


def flare_transfers(log_text: str) -> dict:
    """FLARE's timing of each model-sized transfer in a site's job log, in order: seconds down and up."""
    found = {}
    for key, pattern in (("download_seconds", FLARE_DOWNLOAD), ("upload_seconds", FLARE_UPLOAD)):
        found[key] = [
            float(m.group(1)) for m in pattern.finditer(log_text) if int(m.group(2).replace(",", "")) >= MODEL_SIZED
        ]
    return found


# -- the federation ----------------------------------------------------------------------------------------
def _venv_tool(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _check(command: list[str], cwd: str | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}")
    return done.stdout


def prepare(work: str) -> tuple[str, str]:
    """Synthetic FeTS-shaped sites, the provisioned kits with their policies; (sites folder, prod folder)."""
    from fedseg.app.testbed import DOMAIN
    from fedseg.app.testbed_federation import newest_kits, write_project
    from fedseg.data_prep.fets2022 import prepare_sites
    from fedseg.data_prep.synthetic import SyntheticConfig, generate

    config = SyntheticConfig(shape=SHAPE, institutions=institutions(INSTITUTIONS))
    data = generate(os.path.join(work, "synthetic"), config)
    sites = os.path.join(work, "sites")
    prepare_sites(data, sites, partitions=[1, 2, 3], validation_fraction=0.34)
    kits = os.path.join(work, "kits")
    shutil.rmtree(kits, ignore_errors=True)
    project = write_project(PROJECT, os.path.join(kits, "project.yml"), {"default_host": f"server.{DOMAIN}"})
    _check([_venv_tool("nvflare"), "provision", "--force", "-p", project, "-w", kits])
    prod = newest_kits(kits)
    _check([_venv_tool("fedseg"), "install-policy", "server", "--store", os.path.join(work, "store")], cwd=prod)
    for site in SITES:
        _check([_venv_tool("fedseg"), "install-policy", site, "--data-root", sites], cwd=prod)
    return sites, prod


def start_federation(work: str, prod: str, stack) -> dict:
    """The testbed up, every kit started on its host, the admin agent; returns once the sites are connected."""
    from fedseg.app import testbed as testbeds
    from fedseg.app.testbed_federation import AdminAgent, start_kit

    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for name in ("FEDSEG_DATA_ROOT", "FEDSEG_CACHE_DIR"):  # each site's own policy and workspace decide
        env.pop(name, None)
    testbed = stack.enter_context(testbeds.testbed(TESTBED, HOSTS))
    agent = AdminAgent(testbed, "admin", prod, env, os.path.join(work, "admin_agent.log"), RESEARCHER)
    stack.callback(agent.close)
    kits = {name: os.path.join(prod, name) for name in ("server", *SITES)}
    start_kit(testbed, "server", kits["server"], env)
    for site in SITES:
        start_kit(testbed, site, kits[site], env)
    connected = agent.wait_connected(SITES, timeout=240, user=ADMIN)
    if not set(SITES) <= set(connected):
        raise RuntimeError(f"only {connected} connected to the server; logs: {prod}/<kit>/log.txt")
    return {"testbed": testbed, "agent": agent, "work": work, "prod": prod, "server_kit": kits["server"]}


# -- one job -----------------------------------------------------------------------------------------------
def link_counters(testbed) -> dict[str, tuple[int, int]]:
    """(bytes towards the site, bytes from the site) so far, per site: its link's bridge-side veth end."""
    counters = {}
    for site in SITES:
        base = os.path.join("/sys/class/net", testbed.host(site).link, "statistics")
        with open(os.path.join(base, "tx_bytes")) as tx, open(os.path.join(base, "rx_bytes")) as rx:
            counters[site] = (int(tx.read()), int(rx.read()))
    return counters


def submit(federation: dict, precision: str, rate: str, rounds: int) -> tuple[str, float]:
    """Every hospital's link shaped to ``rate`` (both ways), then the FedRef job submitted; (job id, time.time()
    just before the submission: the job's wall time counts from there, shaping and export left out)."""
    from fedseg.jobs.export import export_job
    from fedseg.jobs.recipes import JobSettings

    for site in SITES:
        federation["testbed"].shape(site, None if rate == UNLIMITED else rate)
    name = f"network_{precision}_{rate}"
    settings = JobSettings.for_profile(
        "fets2022", algorithm="fedref", num_rounds=rounds, quantization=PRECISIONS[precision], **JOB
    )
    job = export_job(replace(settings, name=name), os.path.join(federation["work"], "jobs", name))
    started = time.time()
    return federation["agent"].call("submit", job=job), started


def progress_line(label: str, figures: dict, link: dict) -> str:
    """A round as it comes: its seconds, the slowest site's work, the link's MB each way per site."""
    return (
        f"  {label} round {figures['round']}: {figures['seconds']:.1f} s "
        f"(slowest site's work {figures['slowest_site_seconds']:.1f} s), link "
        f"{statistics.median(link['link_bytes_down'].values()) / 1e6:.1f} MB down / "
        f"{statistics.median(link['link_bytes_up'].values()) / 1e6:.1f} MB up per site"
        + (f", missing {', '.join(figures['missing'])}" if figures["missing"] else "")
    )


def follow_rounds(federation: dict, job_id: str, rounds: int, deadline: float, label: str):
    """Poll the server's round records until ``rounds`` are there or the deadline; (records, link bytes by round).

    The link counters are read when new records appear: the bytes since the previous record, shared out over
    the rounds that appeared in that poll.
    """
    from fedseg.app.testbed_federation import server_records

    counters = link_counters(federation["testbed"])
    seen: list[dict] = []
    link: dict[int, dict] = {}
    while len(seen) < rounds and time.time() < deadline:
        records = server_records(federation["server_kit"], job_id)
        if len(records) > len(seen):
            now = link_counters(federation["testbed"])
            new = records[len(seen) :]
            for record in new:
                link[record["round"]] = {
                    "link_bytes_down": {s: (now[s][0] - counters[s][0]) // len(new) for s in SITES},
                    "link_bytes_up": {s: (now[s][1] - counters[s][1]) // len(new) for s in SITES},
                }
            counters = now
            for record in new:
                print(progress_line(label, round_figures(record), link[record["round"]]), flush=True)
            seen = records
        time.sleep(0.25)
    return seen, link


def run_config(federation: dict, precision: str, rate: str, rounds: int, timeout: float, label: str) -> dict:
    """One job over links shaped to ``rate``: the round records and each round's link bytes, as they come."""
    from fedseg.app.testbed_federation import server_records

    job_id, started = submit(federation, precision, rate, rounds)
    deadline = started + timeout
    seen, link = follow_rounds(federation, job_id, rounds, deadline, label)
    meta = federation["agent"].call("wait", job_id=job_id, timeout=max(30.0, deadline - time.time()))
    wall = time.time() - started
    records = server_records(federation["server_kit"], job_id) or seen
    flare_log = {}
    for site in SITES:
        with open(os.path.join(federation["prod"], site, job_id, "log.txt"), encoding="utf-8", errors="replace") as f:
            flare_log[site] = flare_transfers(f.read())
    return {
        "precision": precision,
        "rate": rate,
        "quantization": PRECISIONS[precision],
        "rounds": rounds,
        "job_id": job_id,
        "status": meta.get("status"),
        "job_wall_seconds": wall,
        "completed_rounds": len(records),
        "per_round": [{**round_figures(r), **link.get(r["round"], {})} for r in records],
        "flare_log": flare_log,
    }
