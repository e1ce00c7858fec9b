"""The committed job folders: what `make jobs` writes, self-contained, editable."""

from __future__ import annotations

import filecmp
import json
import os

import pytest
from commands import make, ok

from fedseg.jobs.export import JOBS_DIR
from fedseg.jobs.recipes import ALGORITHMS


def tree(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


@pytest.fixture(scope="module")
def made_jobs(tmp_path_factory) -> str:
    """The job folders `make jobs` writes (into a scratch folder: the committed ones stay as they are)."""
    out = tmp_path_factory.mktemp("jobs")
    output = ok(make("jobs", JOBS_DIR=str(out), timeout=300))
    assert sorted(os.listdir(out)) == sorted(ALGORITHMS), output
    return str(out)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_committed_job_is_what_make_jobs_writes(made_jobs, algorithm):
    fresh = os.path.join(made_jobs, algorithm)
    committed = os.path.join(JOBS_DIR, algorithm)
    assert os.path.isdir(committed), f"jobs/{algorithm} is missing: run `make jobs`"
    assert tree(fresh) == tree(committed), f"jobs/{algorithm} is stale: run `make jobs`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, tree(fresh), shallow=False)
    assert not mismatch and not errors, f"jobs/{algorithm} differs in {mismatch + errors}: run `make jobs`"


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_job_is_self_contained_and_names_no_local_path(algorithm):
    folder = os.path.join(JOBS_DIR, algorithm)
    files = tree(folder)
    assert "app/custom/client.py" in files and "app/custom/fedseg/trainer.py" in files
    for name in files:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            text = f.read()
        for fragment in (os.path.expanduser("~"), os.path.dirname(JOBS_DIR), "/tmp/"):
            assert fragment not in text, f"{name} names {fragment}"
    client = json.load(open(os.path.join(folder, "app", "config", "config_fed_client.json")))
    executor = client["executors"][0]["executor"]["args"]
    assert executor["task_script_path"] == "client.py"
    assert "--data_root" not in executor["task_script_args"]  # each site sets FEDSEG_DATA_ROOT
    assert "--local_epochs 2" in executor["task_script_args"]


def test_fedref_hyperparameters_are_visible_in_the_config():
    server = json.load(open(os.path.join(JOBS_DIR, "fedref", "app", "config", "config_fed_server.json")))
    (controller,) = [w for w in server["workflows"] if w["id"] == "controller"]
    assert controller["path"] == "fedseg.controller.FedRefController"
    args = controller["args"]
    assert (args["buffer_size"], args["lambda1"], args["lambda2"], args["num_rounds"]) == (3, 0.0, 0.3, 10)
    assert args["variant"] == "trend"


def test_export_with_the_fets2022_profile_as_the_readme_writes_it(tmp_path):
    from fedseg.jobs.export import main

    assert main(["--profile", "fets2022", "--out", str(tmp_path)]) == 0
    client = json.load(open(tmp_path / "fedref" / "app" / "config" / "config_fed_client.json"))
    script_args = client["executors"][0]["executor"]["args"]["task_script_args"]
    for expected in ("--local_steps 50", "--crop 128 128 128", "--channels 32 64 128 256", "--batch_size 1",
                     "--val_max_cases 8", "--threads 0"):
        assert expected in script_args, expected
    assert "--data_root" not in script_args and "--cache_dir" not in script_args  # each site sets its own
    server = json.load(open(tmp_path / "fedref" / "app" / "config" / "config_fed_server.json"))
    assert "channels" in json.dumps(server) and "256" in json.dumps(server)  # the server builds the same network
