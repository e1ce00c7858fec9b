"""Run the README's commands as a user types them: Makefile targets and the installed ``fedseg`` script.

Both use the virtualenv running the tests (``sys.prefix``), so a test never reinstalls it: ``make -o``
treats the install stamp as up to date whatever its age.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT = os.path.join(REPO_ROOT, "app", "provision", "project.yml")
VENV = sys.prefix


def make(target: str, timeout: float = 900, **variables: str) -> subprocess.CompletedProcess:
    """``make <target> NAME=value ...`` in the repository root; stdout and stderr together in ``.stdout``."""
    command = [
        "make",
        "-o",
        os.path.join(VENV, ".installed"),
        target,
        f"VENV={VENV}",
        *(f"{name}={value}" for name, value in variables.items()),
    ]
    return subprocess.run(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def fedseg(*args: str, cwd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``.venv/bin/fedseg <args>`` run in ``cwd``; stdout and stderr together in ``.stdout``."""
    return subprocess.run(
        [os.path.join(VENV, "bin", "fedseg"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    """The command's output, after checking it exited 0 (else the assertion shows the output's end)."""
    assert result.returncode == 0, f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout[-4000:]}"
    return result.stdout


def provision(workspace, server: dict, extra_participants=(), name: str | None = None) -> str:
    """`make provision` of the committed project.yml with the server's entries changed (``server``: ports, host
    name) and any participants added, as a project admin edits it; returns the kits' folder the command prints."""
    from fedseg.app.testbed_federation import write_project

    path = write_project(PROJECT, os.path.join(workspace, "project.yml"), server, extra_participants, name)
    output = ok(make("provision", PROJECT_YML=path, PROVISION_DIR=str(workspace), timeout=120))
    (kits,) = [line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("startup kits: ")]
    return kits.rstrip("/")
