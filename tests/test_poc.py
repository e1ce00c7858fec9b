"""A real POC federation on localhost: server and sites as separate processes, the job submitted through
the Flare API session, the report written, and nothing left running."""

from __future__ import annotations

import json
import subprocess

import pytest

from app.cli import main as fedseg

pytestmark = pytest.mark.integration


def flare_processes(workspace: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if workspace in line]


def test_poc_runs_fedref_on_two_sites_and_stops_everything(tmp_path, tiny_fets):
    from data_prep.fets2022 import prepare_sites

    sites = tmp_path / "sites"
    prepare_sites(tiny_fets, str(sites), partitions=[1, 2], validation_fraction=0.34)
    out = tmp_path / "poc"
    code = fedseg(["poc", "--data-root", str(sites), "--out", str(out), "--rounds", "2", "--local-epochs", "1",
                   "--crop", "32", "32", "24", "--channels", "8", "16", "32"])
    assert code == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["rounds"] == 2 and sorted(summary["sites"]) == ["site-1", "site-2"]
    assert summary["final"]["source"] == "cross_site_eval"
    assert 0.0 <= summary["final"]["overall"]["dice_mean"] <= 1.0
    project = (out / "workspace" / "project.yml").read_text()
    assert "fed_learn_port: 8002" not in project  # ports picked free, not the fixed defaults
    assert flare_processes(str(out)) == []
    info = json.loads(next((out / "workspace").rglob("run.json")).read_text())
    assert info["mode"] == "poc" and info["status"].startswith("FINISHED")
    assert info["settings"]["data_root"] is None  # the job carried no data path: the sites used their own
