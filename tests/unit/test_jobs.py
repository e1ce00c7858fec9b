"""The committed job folders: what `make jobs` writes, configuration only, editable."""

from __future__ import annotations

import filecmp
import json
import os
import re
import shlex

import pytest
from helpers.commands import make, ok

import fedseg
from fedseg.jobs.export import JOBS_DIR
from fedseg.jobs.recipes import ALGORITHMS
from fedseg.policy import allow_list


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
def test_job_is_configuration_only_and_names_no_local_path(algorithm):
    folder = os.path.join(JOBS_DIR, algorithm)
    files = tree(folder)
    assert files == ["app/config/config_fed_client.json", "app/config/config_fed_server.json", "meta.json"]
    for name in files:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            text = f.read()
        for fragment in (os.path.expanduser("~"), os.path.dirname(JOBS_DIR), "/tmp/"):
            assert fragment not in text, f"{name} names {fragment}"
    client = json.load(open(os.path.join(folder, "app", "config", "config_fed_client.json")))
    (executor,) = client["executors"]
    assert executor["executor"]["path"] == "fedseg.executor.SiteExecutor"
    args = executor["executor"]["args"]
    assert args["package_version"] == fedseg.__version__ and args["drills"] == []
    assert args["training"]["local_epochs"] == 2
    assert set(args) == {"package_version", "training", "drills"}  # no script, command, data or cache path
    server = json.load(open(os.path.join(folder, "app", "config", "config_fed_server.json")))
    assert {
        "id": "version_guard",
        "path": "fedseg.executor.VersionGuard",
        "args": {"package_version": fedseg.__version__},
    } in server["components"]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_class_a_job_names_is_on_the_allow_list_of_its_side(algorithm):
    """A class missing from fedseg.policy would make a hospital's site refuse our own job."""
    config = os.path.join(JOBS_DIR, algorithm, "app", "config")
    for name, role in (("config_fed_client.json", "site"), ("config_fed_server.json", "server")):
        paths = re.findall(r'"path": "([^"]+)"', open(os.path.join(config, name)).read())
        assert paths and set(paths) <= set(allow_list(role)), (name, sorted(set(paths) - set(allow_list(role))))


def test_byoc_export_ships_the_whole_package(tmp_path):
    from fedseg.jobs.export import main

    assert main(["--byoc", "--algorithms", "fedref", "--out", str(tmp_path)]) == 0
    files = tree(str(tmp_path / "fedref"))
    for module in ("client.py", "trainer.py", "executor.py", "controller.py", "fedref.py"):
        assert f"app/custom/fedseg/{module}" in files, module
    assert not any("__pycache__" in f for f in files)


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
    training = client["executors"][0]["executor"]["args"]["training"]
    expected = {
        "local_steps": 50,
        "crop": [128, 128, 128],
        "channels": [32, 64, 128, 256],
        "batch_size": 1,
        "val_max_cases": 8,
        "threads": 0,
    }
    assert {k: training[k] for k in expected} == expected
    assert "data_root" not in json.dumps(client) and "cache_dir" not in json.dumps(client)  # each site sets its own
    server = json.load(open(tmp_path / "fedref" / "app" / "config" / "config_fed_server.json"))
    assert "channels" in json.dumps(server) and "256" in json.dumps(server)  # the server builds the same network


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_the_job_needs_as_many_live_sites_as_its_rounds_need_answers(algorithm):
    """meta.json's min_clients (FLARE fails the job below it) is the controller's (answers a round needs):
    a majority of the three sites, so one dead site does not end the job."""
    meta = json.load(open(os.path.join(JOBS_DIR, algorithm, "meta.json")))
    server = json.load(open(os.path.join(JOBS_DIR, algorithm, "app", "config", "config_fed_server.json")))
    (controller,) = [w for w in server["workflows"] if w["id"] == "controller"]
    assert meta["min_clients"] == controller["args"]["min_clients"] == 2
    assert server["dead_client_grace_period"] == server["dead_client_check_lead_time"] == 60


# every option of the exporter, given a value other than its default, and where the exported job then holds it
TRAINING = {"local_epochs": 3, "local_steps": 5, "lr": 0.01, "batch_size": 3, "samples_per_case": 4}
TRAINING |= {"crop": [32, 32, 24], "loss": "dice_ce", "channels": [8, 16, 32], "sw_batch_size": 2}
TRAINING |= {"val_max_cases": 4, "cache_ram_mb": 10, "amp": False, "seed": 5, "threads": 2, "num_workers": 1}
TRAINING_OPTIONS = [
    word
    for key, value in TRAINING.items()
    for word in (
        f"--{key.replace('_', '-')}",
        *(str(v).lower() for v in (value if isinstance(value, list) else [value])),
    )
]
FEDREF_OPTIONS = shlex.split(
    "--sites a b c d --rounds 4 --min-clients 3 --clients-per-round 2 --no-validate-absent-sites "
    "--wait-after-min-seconds 30 --dead-site-seconds 45 --p 4 --lambda1 0.1 --lambda2 0.2 "
    "--reference-weighting linear --lambda2-factor 1.5 --lambda2-every 2 --lambda2-max 0.9 "
    "--fedref-variant diagonal --fedref-momentum 0.5 --fedref-alpha-max 0.3 --resume-job stopped-1 "
    "--planned-rounds 9 --name trip --fault a:nan:1 --no-cross-site-eval --quantization float16"
)
FEDREF_CONTROLLER = {"num_clients": 4, "num_rounds": 4, "min_clients": 3, "clients_per_round": 2}
FEDREF_CONTROLLER |= {"validate_absent": False, "wait_after_min_seconds": 30, "buffer_size": 4, "lambda1": 0.1}
FEDREF_CONTROLLER |= {"lambda2": 0.2, "reference_weighting": "linear", "lambda2_factor": 1.5, "lambda2_every": 2}
FEDREF_CONTROLLER |= {"lambda2_max": 0.9, "variant": "diagonal", "momentum": 0.5, "alpha_max": 0.3}
FEDREF_CONTROLLER |= {"resume_job": "stopped-1", "planned_rounds": 9}
ROUND_TRIP = {  # algorithm: (options, what its controller's arguments then hold)
    "fedref": (FEDREF_OPTIONS, FEDREF_CONTROLLER),
    "fedprox": (
        shlex.split("--fedprox-mu 0.05 --selection-policy random:2 --time-budget-seconds 3600"),
        {"fedprox_mu": 0.05, "selection_policy": "random:2", "time_budget_seconds": 3600},
    ),
    "fedadam": (["--server-lr", "0.2"], {"optimizer_args": {"lr": 0.2, "betas": [0.9, 0.99], "eps": 0.001}}),
    "fedavgm": (["--server-lr", "0.5", "--server-momentum", "0.7"], {"optimizer_args": {"lr": 0.5, "momentum": 0.7}}),
    "scaffold": (["--byoc", "--profile", "fets2022"], {}),
    "fedpidavg": (
        shlex.split("--pid-alpha 0.5 --pid-beta 0.3 --pid-gamma 0.2 --pid-window 4"),
        {"pid_alpha": 0.5, "pid_beta": 0.3, "pid_gamma": 0.2, "pid_window": 4},
    ),
    "fedavg": (TRAINING_OPTIONS, {"participation_seed": 5}),
}


def _exported(tmp_path, algorithm: str, argv: list[str]) -> dict:
    from fedseg.jobs.export import main

    assert main(["--algorithms", algorithm, "--out", str(tmp_path), *argv]) == 0
    config = os.path.join(tmp_path, algorithm, "app", "config")
    return {
        "meta": json.load(open(os.path.join(tmp_path, algorithm, "meta.json"))),
        "server": json.load(open(os.path.join(config, "config_fed_server.json"))),
        "client": json.load(open(os.path.join(config, "config_fed_client.json"))),
        "files": tree(os.path.join(tmp_path, algorithm)),
    }


@pytest.mark.parametrize("algorithm", list(ROUND_TRIP))
def test_every_exporter_option_reaches_the_exported_job(tmp_path, algorithm):
    argv, controller_args = ROUND_TRIP[algorithm]
    job = _exported(tmp_path, algorithm, argv)
    (controller,) = [w for w in job["server"]["workflows"] if w["id"] == "controller"]
    for key, value in controller_args.items():
        found = controller["args"][key]
        assert (found["args"] if key == "optimizer_args" else found) == value, key
    executor = job["client"]["executors"][0]["executor"]["args"]
    if algorithm == "fedref":
        assert job["meta"]["name"] == "trip" and job["meta"]["min_clients"] == 3
        assert job["server"]["dead_client_grace_period"] == 45 and executor["drills"] == ["a:nan:1"]
        assert not [w for w in job["server"]["workflows"] if w["path"].endswith("CrossSiteModelEval")]
        assert "ModelQuantizer" in json.dumps(job["server"]["task_data_filters"])
    if algorithm == "scaffold":
        assert "app/custom/fedseg/trainer.py" in job["files"]
        assert executor["training"]["crop"] == [128, 128, 128]  # the fets2022 profile's
    if algorithm == "fedavg":
        assert executor["training"] == TRAINING
        (persistor,) = [c for c in job["server"]["components"] if c["id"] == "persistor"]
        assert persistor["args"] == {"channels": [8, 16, 32], "init_seed": 5}


def test_the_round_trip_gives_every_exporter_option():
    """A new job field gets an option by itself; this test makes it show where the exported job holds it."""
    from fedseg.jobs.export import build_parser
    from fedseg.jobs.options import offered_fields

    parser, given = build_parser(), set()
    for algorithm, (argv, _) in ROUND_TRIP.items():
        args = parser.parse_args(["--algorithms", algorithm, *argv])
        given |= {key for key in offered_fields("export") if getattr(args, key) is not None}
    assert sorted(set(offered_fields("export")) - given) == []
