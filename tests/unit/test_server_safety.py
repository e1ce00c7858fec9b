"""A job is data: what a hostile researcher could put into a job, and the server's refusal of each.

No federation here: the controllers' and the persistor's checks run on a fake workspace (tests/helpers/server_fakes.py),
the app validator on folders laid out as FLARE deploys them.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from helpers.server_fakes import FakeEngine, start, stopped_run, write_records

from fedseg.checkpoint import find_resume_files, load_file, load_state_dict, to_arrays, to_tensors
from fedseg.controller import FedRefController, RecordingFedAvg, RecordingFedOpt, RecordingScaffold
from fedseg.jobs.export import default_settings
from fedseg.jobs.recipes import ALGORITHMS, JobSettings
from fedseg.persistor import SeededModelPersistor
from fedseg.policy import SERVER_CLASSES, ConfigOnlyJobValidator, with_allow_list
from fedseg.server_config import (
    OPTIMIZER_ARGS,
    SCHEDULER_ARGS,
    SERVER_CONFIG_FILE,
    JobRefused,
    ServerConfig,
    plain_name,
)
from fedseg.settings import profile

ADAM = {"path": "torch.optim.Adam", "config_type": "dict", "args": {"lr": 0.03, "betas": [0.9, 0.99], "eps": 1e-3}}
CONSTANT = {
    "path": "torch.optim.lr_scheduler.ConstantLR",
    "config_type": "dict",
    "args": {"factor": 1.0, "total_iters": 1},
}


def fedopt(**overrides) -> RecordingFedOpt:
    args = dict(num_clients=2, num_rounds=1, optimizer_args=ADAM, lr_scheduler_args=CONSTANT, algorithm_name="fedadam")
    return RecordingFedOpt(**{**args, **overrides})


class Exploding:
    """Unpickling this runs code: what a crafted checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/fedseg-pwned",))


# -- plain names ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value",
    [
        "/etc/passwd",
        "a/../../x",
        "..",
        ".",
        "../x",
        "x/y",
        "",
        ".hidden",
        "a\\b",
        "{WORKSPACE}/x",
        "x" * 129,
        "${secret:TOKEN}",
        3,
        None,
        ["x"],
    ],
)
def test_a_name_a_job_gives_is_one_plain_component(value):
    with pytest.raises(JobRefused, match="must be a plain name"):
        plain_name("metrics_filename", value)


def test_plain_names_pass():
    for value in ("round_metrics.jsonl", "FL_global_model.pt", "3f2c-aa_01.b", "resumed"):
        assert plain_name("x", value) == value


@pytest.mark.parametrize(
    "build",
    [
        lambda: RecordingFedAvg(num_clients=2, num_rounds=1, metrics_filename="/tmp/evil.jsonl"),
        lambda: RecordingFedAvg(num_clients=2, num_rounds=1, save_filename="../../FL_global_model.pt"),
        lambda: RecordingScaffold(num_clients=2, num_rounds=1, metrics_filename="../x"),
        lambda: FedRefController(num_clients=2, num_rounds=1, resume_job=".."),
        lambda: FedRefController(num_clients=2, num_rounds=1, resume_job="../other-server/job"),
        lambda: FedRefController(num_clients=2, num_rounds=1, resume_job="/var/lib/fedseg/job"),
    ],
)
def test_a_path_in_a_job_is_refused_at_construction(build):
    with pytest.raises(JobRefused, match=r"^\w+ = .*: must be a plain name"):
        build()


def test_a_job_may_not_give_the_initial_weights_or_a_fedopt_model():
    with pytest.raises(JobRefused, match="model: a job may not give the initial weights"):
        RecordingFedAvg(num_clients=2, num_rounds=1, model={"w": [1.0]})
    with pytest.raises(JobRefused, match="model: a job may not give"):
        RecordingScaffold(num_clients=2, num_rounds=1, model={"w": [1.0]})
    with pytest.raises(JobRefused, match="source_model: a job names no model"):
        fedopt(source_model="persistor")


# -- the server's caps and the controllers' own arguments -------------------------------------------------------
def test_the_committed_settings_and_the_fets2022_profile_fit_the_defaults(tmp_path):
    for algorithm in ALGORITHMS:
        for name in ("demo", "fets2022"):
            settings = default_settings(algorithm, profile=name)
            ServerConfig().check_network(list(settings.channels))
            ServerConfig().check_rounds(settings.num_rounds)
    assert max(profile("fets2022").training_values()["channels"]) <= ServerConfig().max_channels


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(num_rounds=1001),
            r"num_rounds = 1001 exceeds the server's cap max_rounds = 1000 \(the server defaults\)",
        ),
        (dict(num_rounds="5"), r"num_rounds = '5': must be an integer"),
        (dict(num_rounds=0), r"num_rounds = 0: must be in \[1, inf\]"),
        (dict(num_rounds=True), r"num_rounds = True: must be an integer"),
        (dict(min_clients=0), r"min_clients = 0: must be in"),
        (dict(min_clients="2"), r"min_clients = '2': must be an integer"),
        (dict(wait_after_min_seconds=10**9), r"wait_after_min_seconds = 1000000000: must be in \[0, 86400\]"),
        (dict(wait_after_min_seconds=1.5), r"wait_after_min_seconds = 1.5: must be an integer"),
        (dict(clients_per_round=-1), r"clients_per_round = -1"),
        (dict(validate_absent="yes"), r"validate_absent = 'yes': must be true or false"),
        (dict(fedprox_mu=1e9), r"fedprox_mu = 1000000000.0: must be in \[0.0, 10.0\]"),
        (dict(fedprox_mu=float("nan")), r"fedprox_mu must be a finite non-negative number"),  # NVFlare's own check
        (dict(task_name="validate"), r"task_name = 'validate': must be one of \['train'\]"),
        (
            dict(algorithm_name="fedavg", fedprox_mu=0.5),
            r"algorithm_name = 'fedavg': this controller's settings run 'fedprox'",
        ),
        (dict(start_round=990), r"start_round = 990: a job starts at round 0"),
        (dict(aggregation_weights={"site-1": -1.0}), r"aggregation_weights\['site-1'\] = -1.0"),
        (dict(patience="3"), r"patience = '3': must be an integer"),
    ],
)
def test_fedavg_settings_out_of_bounds_are_refused_at_run_start(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):  # JobRefused, or NVFlare's own ValueError at construction
        start(RecordingFedAvg(**{"num_clients": 2, "num_rounds": 2, "min_clients": 1, **overrides}), tmp_path)


def test_legitimate_settings_start(tmp_path):
    start(RecordingFedAvg(num_clients=3, num_rounds=10, min_clients=2), tmp_path)
    start(
        RecordingFedAvg(num_clients=3, num_rounds=10, min_clients=2, fedprox_mu=0.01, algorithm_name="fedprox"),
        tmp_path,
    )
    start(
        FedRefController(num_clients=3, num_rounds=10, min_clients=2, lambda1=0.0, lambda2=0.3, variant="trend"),
        tmp_path,
    )
    start(fedopt(), tmp_path)
    start(RecordingScaffold(num_clients=3, num_rounds=10, min_clients=2), tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lambda1=1e6), r"lambda1 = 1000000.0: must be in \[0.0, 10.0\]"),  # a frozen model: a query oracle
        (dict(lambda2=-0.1), r"lambda2 = -0.1"),
        (dict(lambda2="0.3"), r"lambda2 = '0.3': must be a finite number"),
        (dict(buffer_size=10**6), r"buffer_size = 1000000: must be in \[1, 64\]"),
        (dict(momentum=1.0), r"momentum = 1.0: must be in \[0.0, 1.0\)"),
        (dict(alpha_max=2.0), r"alpha_max = 2.0"),
        (dict(reference_weighting="recent"), r"reference_weighting = 'recent'"),
        (dict(lambda2_factor=2.0, lambda2_every=1), r"lambda2_factor = 2.0 every 1 rounds needs lambda2_max"),
        (dict(lambda2_factor=2.0, lambda2_every=1, lambda2_max=1e9), r"lambda2_max = 1000000000.0"),
        (dict(fedprox_mu=0.1), r"fedprox_mu = 0.1: only the fedprox controller"),
    ],
)
def test_fedref_settings_out_of_bounds_are_refused(tmp_path, overrides, message):
    with pytest.raises(JobRefused, match=message):
        start(FedRefController(num_clients=2, num_rounds=2, **overrides), tmp_path)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(optimizer_args={**ADAM, "args": {"lr": 0.0}}), r"optimizer_args.args.lr = 0.0: must be in \(0.0, 10.0\]"),
        (dict(optimizer_args={**ADAM, "args": {"lr": 1e3}}), r"optimizer_args.args.lr = 1000.0"),
        (dict(optimizer_args={**ADAM, "args": {}}), r"optimizer_args.args.lr = None: must be a finite number"),
        (dict(optimizer_args={**ADAM, "path": "torch.optim.LBFGS"}), r"optimizer_args.path = 'torch.optim.LBFGS'"),
        (dict(optimizer_args={**ADAM, "path": "os.system"}), r"optimizer_args.path = 'os.system'"),
        (dict(optimizer_args={**ADAM, "args": {"lr": 0.1, "foreach": True}}), r"unknown argument\(s\) \['foreach'\]"),
        (dict(optimizer_args={**ADAM, "args": {"lr": 0.1, "betas": [0.9, 1.5]}}), r"optimizer_args.args.betas = 1.5"),
        (
            dict(
                optimizer_args={"path": "torch.optim.SGD", "args": {"lr": 1.0, "dampening": 1.0}},
                algorithm_name="fedavgm",
            ),
            r"optimizer_args.args.dampening = 1.0",
        ),
        (dict(lr_scheduler_args={**CONSTANT, "args": {"factor": 0.0}}), r"lr_scheduler_args.args.factor = 0.0"),
        (dict(lr_scheduler_args={**CONSTANT, "path": "torch.optim.lr_scheduler.LambdaLR"}), r"lr_scheduler_args.path"),
        (dict(lr_scheduler_args={**CONSTANT, "config_type": "component"}), r"lr_scheduler_args.config_type"),
        (dict(device="/dev/mem"), r"device = '/dev/mem'"),
        (dict(algorithm_name="fedavgm"), r"algorithm_name = 'fedavgm': this controller's settings run 'fedadam'"),
    ],
)
def test_fedopt_optimiser_settings_are_bounded(tmp_path, overrides, message):
    with pytest.raises(JobRefused, match=message):
        start(fedopt(**overrides), tmp_path)


def test_the_fedopt_classes_the_server_checks_are_the_allow_listed_ones():
    assert set(OPTIMIZER_ARGS) | set(SCHEDULER_ARGS) == {c for c in SERVER_CLASSES if c.startswith("torch.")}
    assert set(ALGORITHMS) == set(ServerConfig().algorithms)


def write_config(root, **values) -> str:
    os.makedirs(os.path.join(root, "local"), exist_ok=True)
    path = os.path.join(root, "local", SERVER_CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(values, f)
    return path


def test_the_server_file_sets_the_caps_and_names_itself(tmp_path):
    path = write_config(tmp_path, max_rounds=5, max_channels=32, max_levels=3, algorithms=["fedavg"])
    with pytest.raises(JobRefused, match=rf"num_rounds = 6 exceeds the server's cap max_rounds = 5 \({path}\)"):
        start(RecordingFedAvg(num_clients=2, num_rounds=6), tmp_path)
    with pytest.raises(
        JobRefused, match=rf"algorithm 'fedref' is not allowed on this server: allowed \['fedavg'\] \({path}\)"
    ):
        start(FedRefController(num_clients=2, num_rounds=1), tmp_path)
    with pytest.raises(JobRefused, match=r"channels = 64 exceeds the server's cap max_channels = 32"):
        start(RecordingFedAvg(num_clients=2, num_rounds=1), tmp_path, SeededModelPersistor(channels=[16, 64]))
    with pytest.raises(JobRefused, match=r"channels \(levels\) = 4 exceeds the server's cap max_levels = 3"):
        start(RecordingFedAvg(num_clients=2, num_rounds=1), tmp_path, SeededModelPersistor(channels=[8, 8, 8, 8]))
    start(RecordingFedAvg(num_clients=2, num_rounds=5), tmp_path, SeededModelPersistor(channels=[16, 32, 32]))


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(max_rounds="1000"), "max_rounds = '1000': must be an integer"),
        (dict(checkpoint_store="relative/store"), "checkpoint_store = 'relative/store': must be an absolute folder"),
        (dict(algorithms=["fedsgd"]), "algorithms = \\['fedsgd'\\]"),
        (dict(max_round=5), "unknown setting\\(s\\) \\['max_round'\\]"),
    ],
)
def test_a_broken_server_file_is_named(tmp_path, values, message):
    write_config(tmp_path, **values)
    with pytest.raises(ValueError, match=message):
        ServerConfig.load(str(tmp_path / "local"))


def test_the_persistor_refuses_a_network_over_the_caps_before_building_it():
    with pytest.raises(JobRefused, match="channels = 'big': must be a list"):
        SeededModelPersistor(channels="big")
    with pytest.raises(JobRefused, match="init_seed = -1"):
        SeededModelPersistor(channels=[8, 16], init_seed=-1)
    with pytest.raises(JobRefused, match=r"channels = 100000 exceeds the server's cap max_channels = 512"):
        ServerConfig().check_network([8, 100000])
    with pytest.raises(
        JobRefused, match="persistor_id = 'persistor': must name a fedseg.persistor.SeededModelPersistor"
    ):
        controller = RecordingFedAvg(num_clients=2, num_rounds=1)
        controller.engine, controller.persistor = FakeEngine("/nonexistent"), object()
        controller.check_job(ServerConfig())


def test_the_seeded_persistor_gives_the_recipe_network():
    settings = JobSettings(channels=(8, 16, 32), seed=3)
    persistor = settings.persistor()
    assert (persistor.channels, persistor.init_seed) == ([8, 16, 32], 3)
    a, b = persistor.network().state_dict(), settings.network().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights: results unchanged


# -- resuming names a job in the server's own store -----------------------------------------------------------
def test_resume_job_continues_from_the_servers_store_with_the_servers_round(tmp_path):
    run = stopped_run(tmp_path)
    controller = start(FedRefController(num_clients=2, num_rounds=2, buffer_size=2, resume_job="stopped-job"), tmp_path)
    assert controller.start_round == 5 and len(controller.updater.buffer) == 1
    assert controller.persistor._start_from == os.path.join(run, "app_server", "FL_global_model.pt")


def test_a_configured_checkpoint_store_is_searched_instead_of_the_workspace(tmp_path):
    store = tmp_path / "store"
    stopped_run(store)
    write_config(tmp_path / "server", checkpoint_store=str(store))
    controller = start(
        FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job="stopped-job"), tmp_path / "server"
    )
    assert controller.start_round == 5


@pytest.mark.parametrize(
    "setup, job, message",
    [
        (lambda root: None, "no-such-job", "resume_job = 'no-such-job': no such run in the server's checkpoint store"),
        (lambda root: os.makedirs(os.path.join(root, "empty")), "empty", "that run left no fedref_reference_buffer.pt"),
        (lambda root: os.makedirs(os.path.join(root, "local"), exist_ok=True), "local", "that run left no"),
        (
            lambda root: os.symlink(stopped_run(os.path.join(root, "..", "elsewhere")), os.path.join(root, "linked")),
            "linked",
            "resume_job = 'linked': not a run folder of the server's checkpoint store",
        ),
        (lambda root: stopped_run(root, "this-job"), "this-job", "not a run folder"),
    ],
)
def test_resume_job_outside_the_store_or_without_files_is_refused(tmp_path, setup, job, message):
    root = tmp_path / "server"
    os.makedirs(root)
    setup(str(root))
    with pytest.raises(JobRefused, match=message):
        start(FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job=job), root)


def finished_in_job_store(tmp_path, job="finished-job", run=None) -> str:
    """A server kit whose FLARE moved a finished job's workspace (``run``, default a stopped run) into its job store
    (the run folder gone)."""
    import io
    import zipfile

    run = run or stopped_run(tmp_path / "finished")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for folder, _, files in os.walk(run):
            for name in files:
                z.write(os.path.join(folder, name), os.path.relpath(os.path.join(folder, name), run))
        z.writestr("log.txt", "the rest of the workspace is not unpacked")
    store = tmp_path / "store" / "jobs-storage" / job
    os.makedirs(store)
    for name, content in (("data", b"job"), ("meta", b"{}"), ("workspace", archive.getvalue())):
        (store / name).write_bytes(content)
    resources = {"components": [{"id": "job_manager", "args": {"uri_root": str(tmp_path / "store" / "jobs-storage")}}]}
    os.makedirs(tmp_path / "server" / "local")
    (tmp_path / "server" / "local" / "resources.json").write_text(json.dumps(resources))
    return str(tmp_path / "server")


def test_a_finished_job_is_continued_from_the_workspace_flare_saved_in_its_job_store(tmp_path):
    server = finished_in_job_store(tmp_path)
    controller = start(FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job="finished-job"), server)
    assert controller.start_round == 5 and len(controller.updater.buffer) == 1
    unpacked = os.path.join(server, "this-job", "resumed_from", "finished-job")
    assert controller.persistor._start_from == os.path.join(unpacked, "app_server", "FL_global_model.pt")
    assert sorted(os.listdir(unpacked)) == ["app_server", "fedref_reference_buffer.pt"]  # only the checkpoints
    with pytest.raises(JobRefused, match="no such run in the server's checkpoint store or job store"):
        start(FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job="other-job"), server)


def test_a_continuation_from_the_job_store_takes_the_stopped_runs_newest_buffer_and_its_records(tmp_path):
    """A stopped job that was itself a continuation holds the run before it under resumed_from/: its older buffer
    must not win because it was unpacked last (the files keep the times they had in the archive)."""
    import time

    run = stopped_run(tmp_path / "finished", round_number=4, rounds=[2, 3, 4])
    earlier = stopped_run(os.path.join(run, "resumed_from"), "first-job", round_number=1, rounds=[0, 1])
    an_hour_ago = time.time() - 3600
    for folder, _, files in os.walk(earlier):
        for name in files:
            os.utime(os.path.join(folder, name), (an_hour_ago, an_hour_ago))
    server = finished_in_job_store(tmp_path, run=run)
    controller = start(
        FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job="finished-job", planned_rounds=8),
        server,
    )
    assert (controller.start_round, controller.num_rounds) == (5, 3)
    unpacked = os.path.join(server, "this-job", "resumed_from", "finished-job")
    assert controller.persistor._start_from == os.path.join(unpacked, "app_server", "FL_global_model.pt")
    for relative in ("round_metrics.jsonl", "resumed_from/first-job/round_metrics.jsonl"):
        with open(os.path.join(unpacked, relative)) as f, open(os.path.join(run, relative)) as g:
            assert f.read() == g.read()


def test_a_stored_workspace_member_that_would_leave_the_run_folder_is_refused(tmp_path):
    import io
    import zipfile

    from fedseg.checkpoint import unpack_stored_run

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../escaped/fedref_reference_buffer.pt", b"x")
    with pytest.raises(ValueError, match="would leave"):
        unpack_stored_run(archive.getvalue(), str(tmp_path / "out"))
    assert not (tmp_path / "escaped").exists()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:  # the round records, unpacked too, are checked the same way
        z.writestr("../../escaped/round_metrics.jsonl", b"{}")
    with pytest.raises(ValueError, match="would leave"):
        unpack_stored_run(archive.getvalue(), str(tmp_path / "out"))
    assert not (tmp_path / "escaped").exists()


def test_symlinked_files_inside_a_run_are_not_followed(tmp_path):
    outside = stopped_run(tmp_path / "outside")
    run = tmp_path / "server" / "job-1"
    os.makedirs(run)
    os.symlink(os.path.join(outside, "fedref_reference_buffer.pt"), run / "fedref_reference_buffer.pt")
    with pytest.raises(FileNotFoundError, match="no fedref_reference_buffer.pt"):
        find_resume_files(str(run))


def test_planned_rounds_run_only_the_rounds_still_to_do(tmp_path):
    stopped_run(tmp_path)  # its buffer is round 4's: the run continues at round 5
    controller = start(
        FedRefController(num_clients=2, num_rounds=10, buffer_size=2, resume_job="stopped-job", planned_rounds=8),
        tmp_path,
    )
    assert (controller.start_round, controller.num_rounds) == (5, 3)  # rounds 5, 6, 7: 8 in all
    controller = start(
        FedRefController(num_clients=2, num_rounds=10, buffer_size=2, resume_job="stopped-job", planned_rounds=6),
        tmp_path,
    )
    assert (controller.start_round, controller.num_rounds) == (5, 1)
    without = start(FedRefController(num_clients=2, num_rounds=2, buffer_size=2, resume_job="stopped-job"), tmp_path)
    assert (without.start_round, without.num_rounds) == (5, 2)  # num_rounds more, as before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(planned_rounds=5), r"^planned_rounds = 5: run stopped-job already did 5 of the 5 planned rounds$"),
        (dict(planned_rounds=3), r"^planned_rounds = 3: run stopped-job already did 5 of the 3 planned rounds$"),
        (dict(planned_rounds="8"), r"^planned_rounds = '8': must be an integer$"),
        (dict(planned_rounds=True), r"^planned_rounds = True: must be an integer$"),
        (dict(planned_rounds=0), r"^planned_rounds = 0: must be in \[1, inf\]$"),
        (dict(planned_rounds=1001), r"^planned_rounds = 1001 exceeds the server's cap max_rounds = 1000"),
        (
            dict(planned_rounds=8, resume_job=None),
            r"^planned_rounds = 8: only a job that continues a stopped run \(resume_job\) has planned rounds",
        ),
    ],
)
def test_planned_rounds_out_of_place_are_refused_naming_the_job_and_the_numbers(tmp_path, overrides, message):
    stopped_run(tmp_path)
    args = {"num_clients": 2, "num_rounds": 1, "buffer_size": 2, "resume_job": "stopped-job", **overrides}
    with pytest.raises(JobRefused, match=message):
        start(FedRefController(**args), tmp_path)


def test_planned_rounds_are_capped_by_the_servers_file(tmp_path):
    stopped_run(tmp_path)
    path = write_config(tmp_path, max_rounds=6)
    args = dict(num_clients=2, num_rounds=1, buffer_size=2, resume_job="stopped-job")
    with pytest.raises(JobRefused, match=rf"planned_rounds = 7 exceeds the server's cap max_rounds = 6 \({path}\)"):
        start(FedRefController(**args, planned_rounds=7), tmp_path)
    assert start(FedRefController(**args, planned_rounds=6), tmp_path).num_rounds == 1


def test_the_stopped_runs_round_records_are_copied_beside_the_new_runs(tmp_path):
    run = stopped_run(tmp_path, rounds=[0, 1, 2, 3, 4])
    earlier = write_records(os.path.join(run, "resumed_from", "first-job", "round_metrics.jsonl"), [0], "first")
    write_records(os.path.join(run, "report", "deep", "round_metrics.jsonl"), [9])  # neither its own nor a part
    # FLARE's MetricsArtifactWriter writes another file of the same name, in another format
    write_records(os.path.join(run, "resumed_from", "first-job", "metrics", "round_metrics.jsonl"), [0])
    start(FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job="stopped-job"), tmp_path)
    copied = tmp_path / "this-job" / "resumed_from" / "stopped-job"
    assert (copied / "round_metrics.jsonl").read_text() == open(os.path.join(run, "round_metrics.jsonl")).read()
    assert (copied / "resumed_from" / "first-job" / "round_metrics.jsonl").read_text() == open(earlier).read()
    assert sorted(str(p.relative_to(copied)) for p in copied.rglob("*")) == [
        "resumed_from",
        "resumed_from/first-job",
        "resumed_from/first-job/round_metrics.jsonl",
        "round_metrics.jsonl",
    ]


def test_a_start_round_that_disagrees_with_the_stopped_run_is_refused(tmp_path):
    stopped_run(tmp_path)
    with pytest.raises(JobRefused, match=r"start_round = 2: run stopped-job continues at round 5"):
        start(
            FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job="stopped-job", start_round=2),
            tmp_path,
        )
    start(
        FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job="stopped-job", start_round=5), tmp_path
    )


def test_a_pickle_in_the_store_is_never_unpickled(tmp_path):
    run = tmp_path / "job-1"
    os.makedirs(run / "app_server")
    with open(run / "fedref_reference_buffer.pt", "wb") as f:
        pickle.dump({"capacity": 2, "models": [Exploding()], "round": 0}, f)
    torch.save({"model": {}}, run / "app_server" / "FL_global_model.pt")
    if os.path.exists("/tmp/fedseg-pwned"):
        os.remove("/tmp/fedseg-pwned")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        start(FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job="job-1"), tmp_path)
    torch.save({"model": {"w": Exploding()}}, run / "model.pt")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_state_dict(str(run / "model.pt"))
    assert not os.path.exists("/tmp/fedseg-pwned")


def test_a_resumed_model_of_another_network_is_refused(tmp_path):
    from nvflare.apis.fl_context import FLContext

    stopped_run(tmp_path, channels=(8, 32))
    controller = start(FedRefController(num_clients=2, num_rounds=1, buffer_size=2, resume_job="stopped-job"), tmp_path)
    persistor = controller.persistor
    persistor.model = persistor.network()
    with pytest.raises(JobRefused, match=r"does not fit channels = \[8, 16\]"):
        persistor.load_model(FLContext())


def test_server_state_round_trips_weights_only(tmp_path):
    state = {"capacity": 2, "round": 3, "velocity": {"w": np.ones(3, np.float32)}, "models": [{"w": np.arange(3.0)}]}
    torch.save(to_tensors(state), tmp_path / "s.pt")
    back = to_arrays(load_file(str(tmp_path / "s.pt")))
    assert back["round"] == 3 and back["models"][0]["w"].dtype == np.float64
    np.testing.assert_array_equal(back["velocity"]["w"], state["velocity"]["w"])


# -- the app validator: configuration only ------------------------------------------------------------------
def app(root, *files) -> str:
    for name in ("config/config_fed_server.json", "config/config_fed_client.json", *files):
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("{}")
    return str(root)


def test_a_configuration_only_app_passes_with_flares_signatures(tmp_path):
    folder = app(tmp_path, ".__nvfl_sig.json", "config/.__nvfl_sig.json", "config/.__nvfl_submitter.crt")
    assert ConfigOnlyJobValidator().validate(folder) == ("", {})


@pytest.mark.parametrize(
    "extra",
    [
        "config/buffer.pt",
        "config/environment.json",
        "config/config_fed_server.conf",
        "model/init.pt",
        "meta.json",
        "config/sub/config_fed_server.json",
    ],
)
def test_any_other_file_in_a_job_is_refused_by_name(tmp_path, extra):
    err, info = ConfigOnlyJobValidator().validate(app(tmp_path, extra))
    top = extra.split("/")[0] if extra.startswith("model") else extra
    top = "config/sub" if extra.startswith("config/sub") else top
    assert err.startswith("this server or site refuses the job: its app holds ") and top in err and info == {}
    assert "\n" not in err


def test_a_symlink_in_a_job_is_refused(tmp_path):
    folder = app(tmp_path)
    os.symlink("/etc/passwd", os.path.join(folder, "config", "config_fed_client.json.link"))
    assert "(a symbolic link" in ConfigOnlyJobValidator().validate(folder)[0]


def test_custom_code_is_left_to_nvflares_byoc_authorization(tmp_path):
    from nvflare.private.fed.app.fl_app_validator import FLAppValidator

    folder = app(tmp_path, "custom/fedseg/__init__.py")
    assert ConfigOnlyJobValidator().validate(folder) == ("", {})
    # FLARE's own validator (run first) marks it BYOC, which authorization.json's byoc: none refuses
    assert FLAppValidator("server", [ConfigOnlyJobValidator()]).validate(folder) == ("", {"byoc": True})


def test_the_validator_is_in_both_kits_resources_and_builds_from_them():
    from nvflare.fuel.utils.class_utils import instantiate_class

    for role in ("server", "site"):
        spec = with_allow_list({"format_version": 2}, role)["app_validator"]
        assert isinstance(instantiate_class(spec["path"], spec["args"]), ConfigOnlyJobValidator)
    assert "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor" not in SERVER_CLASSES
    assert "fedseg.network.FedSegUNet" not in SERVER_CLASSES
    assert "nvflare.app_common.logging.job_log_receiver.JobLogReceiver" not in SERVER_CLASSES
    assert "fedseg.persistor.SeededModelPersistor" in SERVER_CLASSES


def test_the_exported_jobs_hold_configuration_only(tmp_path):
    from fedseg.jobs.export import export_job

    for algorithm in ALGORITHMS:
        job = export_job(default_settings(algorithm), str(tmp_path))
        assert ConfigOnlyJobValidator().validate(os.path.join(job, "app")) == ("", {})
        with open(os.path.join(job, "app", "config", "config_fed_server.json")) as f:
            server = json.load(f)
        paths = {c["path"] for c in server["components"] + server["workflows"]}
        assert paths <= set(SERVER_CLASSES), paths - set(SERVER_CLASSES)
        (persistor,) = [c for c in server["components"] if c["id"] == "persistor"]
        assert persistor == {
            "id": "persistor",
            "path": "fedseg.persistor.SeededModelPersistor",
            "args": {"channels": [16, 32, 64, 128], "init_seed": 0},
        }


def test_flares_app_deployer_refuses_a_job_with_a_file_beside_its_configs(tmp_path):
    """The deployment path FLARE takes on the server and on every site (AppDeployer -> AppAuthzService ->
    FLAppValidator with the resources' app_validator), on a workspace laid out as FLARE keeps it."""
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.workspace import Workspace
    from nvflare.fuel.utils.class_utils import instantiate_class
    from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes
    from nvflare.private.fed.app.fl_app_validator import FLAppValidator
    from nvflare.private.fed.utils.app_authz import AppAuthzService
    from nvflare.private.fed.utils.app_deployer import AppDeployer

    spec = with_allow_list({"format_version": 2}, "server")["app_validator"]
    AppAuthzService.initialize(FLAppValidator("server", [instantiate_class(spec["path"], spec["args"])]))
    try:
        workspace_root = tmp_path / "server"
        os.makedirs(workspace_root / "local")
        os.makedirs(workspace_root / "startup")
        workspace = Workspace(root_dir=str(workspace_root), site_name="server")
        jobs = tmp_path / "jobs"
        clean = app(jobs / "clean" / "app")
        dirty = app(jobs / "dirty" / "app", "config/buffer.pt")
        meta = {"submitter_name": "researcher@fedseg.org", "submitter_org": "fedseg", "submitter_role": "lead"}
        ok = AppDeployer().deploy(workspace, "job-ok", meta, "app", zip_directory_to_bytes(clean, ""), FLContext())
        refused = AppDeployer().deploy(
            workspace, "job-bad", meta, "app", zip_directory_to_bytes(dirty, ""), FLContext()
        )
    finally:
        AppAuthzService.initialize(None)
    assert not ok, ok
    assert refused == (
        "this server or site refuses the job: its app holds config/buffer.pt (a job may hold only "
        "config/config_fed_server.json and config/config_fed_client.json; a job is configuration only)"
    )
    assert not os.path.exists(workspace.get_run_dir("job-bad"))  # FLARE removed what it had unpacked


def test_install_policy_server_writes_the_validator_no_byoc_and_the_caps(tmp_path):
    from fedseg.app.kit_policy import install_policy

    kit = tmp_path / "server"
    os.makedirs(kit / "startup")
    os.makedirs(kit / "local")
    (kit / "startup" / "fed_server.json").write_text("{}")
    (kit / "local" / "resources.json.default").write_text(json.dumps({"format_version": 2, "components": []}))
    written = install_policy(str(kit), store=str(tmp_path / "store"))
    assert sorted(os.path.basename(p) for p in written) == ["authorization.json", SERVER_CONFIG_FILE, "resources.json"]
    resources = json.loads((kit / "local" / "resources.json").read_text())
    assert resources["app_validator"] == {"path": "fedseg.policy.ConfigOnlyJobValidator", "args": {}}
    roles = json.loads((kit / "local" / "authorization.json").read_text())["permissions"]
    assert roles and all(rights.get("byoc", "none") == "none" for rights in roles.values())  # absent: not granted
    assert ServerConfig.load(str(kit / "local")) == ServerConfig(source=str(kit / "local" / SERVER_CONFIG_FILE))


def test_an_exported_continuation_names_the_stopped_job_and_nothing_else(tmp_path):
    from dataclasses import replace

    from fedseg.jobs.export import export_job

    job = export_job(replace(default_settings("fedref"), resume_job="3f2c-ab"), str(tmp_path))
    with open(os.path.join(job, "app", "config", "config_fed_server.json")) as f:
        (controller,) = [w for w in json.load(f)["workflows"] if w["id"] == "controller"]
    assert controller["args"]["resume_job"] == "3f2c-ab" and "start_round" not in controller["args"]
    assert "planned_rounds" not in controller["args"]  # written only when set
    with pytest.raises(ValueError, match="only a fedref run can be continued"):
        JobSettings(algorithm="fedavg", resume_job="3f2c-ab")
    with pytest.raises(JobRefused, match="resume_job = 'a/../../x': must be a plain name"):
        JobSettings(resume_job="a/../../x")
    with pytest.raises(ValueError, match="resume_from is a folder on this machine"):
        export_job(replace(default_settings("fedref"), resume_from=str(tmp_path)), str(tmp_path / "out"))


def test_an_exported_continuation_may_give_the_runs_planned_rounds(tmp_path, capsys):
    from fedseg.jobs.export import main

    assert (
        main(["--algorithms", "fedref", "--resume-job", "3f2c-ab", "--planned-rounds", "8", "--out", str(tmp_path)])
        == 0
    )
    with open(tmp_path / "fedref" / "app" / "config" / "config_fed_server.json") as f:
        (controller,) = [w for w in json.load(f)["workflows"] if w["id"] == "controller"]
    assert (controller["args"]["resume_job"], controller["args"]["planned_rounds"]) == ("3f2c-ab", 8)
    with pytest.raises(SystemExit):
        main(["--algorithms", "fedref", "--planned-rounds", "8", "--out", str(tmp_path / "other")])
    assert "--planned-rounds is the total of a continued run: give --resume-job" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"planned_rounds: only a job that continues a stopped run \(resume_job\)"):
        JobSettings(planned_rounds=8)
    with pytest.raises(ValueError, match="planned_rounds must be an integer >= 1, got 0"):
        JobSettings(resume_job="3f2c-ab", planned_rounds=0)
