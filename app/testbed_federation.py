"""A provisioned federation on a testbed (``fedseg.app.testbed``): the project file's kits made for the testbed's
host names, each kit started on its own host, and the admin host's FLARE API sessions.

Shared by ``tests/integration/test_hospitals.py`` and ``bench.network``, so that both run the federation the operator guide
describes: the server's ``default_host`` in ``project.yml`` is the name the sites reach it by, every kit runs
its own ``startup/start.sh`` on its own host, and admin commands come from a host of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable

import yaml

from fedseg.app.testbed import Testbed

ROUND_METRICS_FILE = "round_metrics.jsonl"


def write_project(project_yml: str, out: str, server: dict, extra_participants: Iterable[dict] = (), name=None) -> str:
    """A copy of ``project_yml`` at ``out`` with the server's entries changed (``server``: ``default_host``,
    ports) and participants added, as a project admin edits it before ``nvflare provision``."""
    with open(project_yml, encoding="utf-8") as f:
        project = yaml.safe_load(f)
    for participant in project["participants"]:
        if participant["type"] == "server":
            participant.update(server)
    project["participants"] += list(extra_participants)
    if name:
        project["name"] = name
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(project, f, sort_keys=False)
    return out


def newest_kits(workspace: str) -> str:
    """The ``prod_NN`` folder the last ``nvflare provision`` into ``workspace`` wrote."""
    found = [os.path.join(d, name) for d, dirs, _ in os.walk(workspace) for name in dirs if name.startswith("prod_")]
    if not found:
        raise FileNotFoundError(f"{workspace}: no provisioned kits (prod_NN)")
    return max(found, key=os.path.getmtime)


def start_kit(testbed: Testbed, host: str, kit: str, env: dict | None = None) -> None:
    """``<kit>/startup/start.sh`` on ``host``, as its owner starts it there (it forks and returns)."""
    testbed.run(
        host,
        ["bash", os.path.join(kit, "startup", "start.sh")],
        check=True,
        env=env,
        cwd=kit,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def server_records(server_kit: str, job_id: str) -> list[dict]:
    """A running job's round records as far as written (its run folder in the server kit's workspace)."""
    path = os.path.join(server_kit, job_id, ROUND_METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


class AdminAgent:
    """The admin host's FLARE API (``fedseg.app.flare_agent``), one call at a time."""

    def __init__(self, testbed: Testbed, host: str, kits: str, env: dict | None, log_path: str, user: str) -> None:
        self.user = user
        self._log = open(log_path, "w", encoding="utf-8")
        self.process = testbed.popen(
            host,
            [sys.executable, "-m", "fedseg.app.flare_agent", kits],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )

    def call(self, op: str, **args):
        """One FLARE API operation (``connected``, ``submit``, ``wait``, ``download``, ``abort``, ``close``) as
        ``user`` (default: the agent's user); RuntimeError with FLARE's reason when it fails."""
        args.setdefault("user", self.user)
        self.process.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline() or '{"error": "the admin agent ended"}')
        if "error" in answer:
            raise RuntimeError(f"{op}: {answer['error']}")
        return answer["ok"]

    def wait_connected(self, sites: Iterable[str], timeout: float = 120, user: str | None = None) -> list[str]:
        """The connected sites once ``sites`` are all among them (or what is connected when ``timeout`` ends)."""
        wanted, deadline, now = set(sites), time.time() + timeout, []
        while time.time() < deadline:
            try:
                now = self.call("connected", user=user or self.user)
            except RuntimeError:  # the server is not up (yet, or again): the agent opens a new session next time
                now = []
            if wanted <= set(now):
                break
            time.sleep(2)
        return now

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
