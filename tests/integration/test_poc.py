"""`make poc` as the README gives it: the demo's three sites in a real POC federation on localhost (server
and sites as separate processes, the job submitted through the Flare API session), the report written,
the prepared sites reused, and nothing left running."""

from __future__ import annotations

import json
import os
import subprocess

from helpers.commands import fedseg, make, ok

TINY_TRAINING = "--rounds 2 --local-epochs 1 --crop 32 32 24 --channels 8 16 32"


def flare_processes(workspace: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if workspace in line]


def test_make_poc_runs_fedref_on_the_demos_three_sites_and_stops_everything(tmp_path, tiny_fets):
    from fedseg.data_prep.fets2022 import prepare_sites

    demo = tmp_path / "demo"  # as `make demo` leaves it: three prepared sites under <demo>/sites
    prepare_sites(tiny_fets, str(demo / "sites"), partitions=[1, 2, 3], validation_fraction=0.34)
    datalist = (demo / "sites" / "site-1" / "datalist.json").stat().st_mtime_ns
    out = tmp_path / "poc"
    output = ok(make("poc", DEMO_DIR=str(demo), POC_DIR=str(out), POC_ARGS=TINY_TRAINING))

    assert f"using the prepared sites in {demo / 'sites'}: site-1, site-2, site-3" in output
    assert not (demo / "data").exists() and not (out / "data").exists()  # no second copy of the data made
    assert (demo / "sites" / "site-1" / "datalist.json").stat().st_mtime_ns == datalist
    assert "round 2/2 finished" in output and f"report: {out / 'report' / 'index.html'}" in output
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["rounds"] == 2 and sorted(summary["sites"]) == ["site-1", "site-2", "site-3"]
    assert summary["final"]["source"] == "cross_site_eval"
    assert sorted(summary["final"]["sites"]) == ["site-1", "site-2", "site-3"]
    assert 0.0 <= summary["final"]["overall"]["dice_mean"] <= 1.0
    project = (out / "workspace" / "project.yml").read_text()
    assert "fed_learn_port: 8002" not in project  # ports picked free, not the fixed defaults
    assert flare_processes(str(out)) == []
    info = json.loads(next((out / "workspace").rglob("run.json")).read_text())
    assert info["mode"] == "poc" and info["status"] == "FINISHED:COMPLETED" and info["completed"] is True
    assert (info["completed_rounds"], info["planned_rounds"]) == (2, 2)
    # the submitted job carried no data path (the sites used their own); run.json records where the data was
    submitted = [p for p in (out / "workspace").rglob("*.json") if f"{os.sep}job{os.sep}" in str(p)]
    assert submitted and not any(str(demo) in p.read_text() for p in submitted)
    assert info["settings"]["data_root"] == str(demo / "sites")


def test_poc_without_prepared_sites_says_so_in_one_line(tmp_path):
    result = fedseg("poc", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "poc"), cwd=str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.strip().splitlines() == [
        f"fedseg poc: {tmp_path / 'missing'}: no such folder (prepare the sites with `fedseg prepare` first)"
    ]
