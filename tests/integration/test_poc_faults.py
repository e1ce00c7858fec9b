"""Faults in a real POC federation (server and three sites as separate processes), as an operator meets them:
one site's job process is SIGKILLed once the server has recorded round 1, in a job with min_clients 3 (every
site needed): the server ends the job, and ``fedseg poc`` exits non-zero and says so in one line, and the
report states the status, the rounds done of those planned and the reason.

A killed site in a job that can do without it (the others finish, the records and report list it as
missing), a server that dies mid-run and the command that continues the run are tested across network hosts
with the provisioned kits (tests/integration/test_hospitals.py), which replaced the POC drills of them.

The kill waits for the server's round record, not for a time, and each drill must leave no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from helpers.commands import VENV

ROUNDS = 3
TINY = ["--local-epochs", "1", "--crop", "32", "32", "24", "--channels", "8", "16", "32", "--threads", "1"]
QUICK_FAULTS = ["--wait-after-min-seconds", "5", "--dead-site-seconds", "5"]
VICTIM = "site-3"


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory, tiny_fets) -> str:
    from fedseg.data_prep.fets2022 import prepare_sites

    root = tmp_path_factory.mktemp("poc_fault_sites")
    prepare_sites(tiny_fets, str(root), partitions=[1, 2, 3], validation_fraction=0.34)
    return str(root)


def round_records(workspace: str) -> list[dict]:
    """The server's round records of the running job, as far as written."""
    for folder, _, files in os.walk(workspace):
        if "round_metrics.jsonl" in files and os.sep + "server" + os.sep in folder + os.sep:
            with open(os.path.join(folder, "round_metrics.jsonl"), encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip().endswith("}")]
    return []


def site_job_process(workspace: str, site: str):
    """The job (worker) process of ``site`` in this POC workspace, or None."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if (
            any(part.endswith("worker_process") for part in cmdline)
            and any(workspace in part for part in cmdline)
            and any(part.rstrip("/").endswith(os.sep + site) for part in cmdline)
        ):
            return process
    return None


def poc_with_site_killed(
    sites: str,
    out: str,
    *options: str,
    timeout: float = 400,
    victims=lambda workspace: [site_job_process(workspace, VICTIM)],
) -> tuple[subprocess.Popen, str, list]:
    """Run ``fedseg poc``; SIGKILL the ``victims`` (default VICTIM's job process) once round 1 is recorded.
    Returns (process, output, the round records as they stood at the kill)."""
    command = [
        os.path.join(VENV, "bin", "fedseg"),
        "poc",
        "--data-root",
        sites,
        "--out",
        out,
        "--rounds",
        str(ROUNDS),
        *TINY,
        *QUICK_FAULTS,
        *options,
    ]
    log = open(os.path.join(os.path.dirname(out), "poc_output.txt"), "w+", encoding="utf-8")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    workspace = os.path.join(out, "workspace")
    deadline, at_kill = time.time() + timeout, None
    try:
        while at_kill is None and time.time() < deadline and process.poll() is None:
            records = round_records(workspace)
            targets = [p for p in victims(workspace) if p is not None] if records else []
            if targets:
                for target in targets:
                    target.send_signal(signal.SIGKILL)
                at_kill = records
            time.sleep(0.3)
        assert at_kill is not None, "nothing was killed after round 1"
        process.wait(timeout=max(deadline - time.time(), 1))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log.seek(0)
    return process, log.read(), at_kill


def no_process_left(workspace: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if workspace in line]


def test_a_run_that_loses_a_site_it_needs_fails_and_says_so(three_sites, tmp_path):
    out = str(tmp_path / "poc")
    process, output, _ = poc_with_site_killed(three_sites, out, "--min-clients", "3")

    assert process.returncode == 1, output[-4000:]
    verdict = [line for line in output.splitlines() if line.startswith("fedseg poc: job ")]
    assert len(verdict) == 1 and "did not complete" in verdict[0] and f"of {ROUNDS} rounds" in verdict[0]
    summary = json.loads((tmp_path / "poc" / "report" / "summary.json").read_text())
    job = summary["job"]
    assert job["completed"] is False and job["status"] != "FINISHED:COMPLETED"
    assert job["rounds_done"] < ROUNDS and job["rounds_planned"] == ROUNDS
    assert job["reason"] == "Alive clients 2 < required min 3"  # the server's own words
    page = (tmp_path / "poc" / "report" / "index.html").read_text()
    assert f"NOT completed, {job['rounds_done']} of {ROUNDS} rounds" in page
    assert no_process_left(out) == []
