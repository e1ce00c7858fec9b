"""The FedRef controller's own state: schedule, buffer persistence, and a restart that continues exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers.server_fakes import start, stopped_run
from nvflare.app_common.abstract.fl_model import FLModel

from fedseg.checkpoint import to_tensors
from fedseg.controller import FedRefController, _plain, update_problem
from fedseg.fedref import FedRefUpdater
from fedseg.server_config import JobRefused


def model(rng) -> dict:
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}


def test_restarted_controller_gives_the_same_next_global_model(tmp_path):
    rng = np.random.default_rng(0)
    initial = model(rng)
    averaged = [model(rng) for _ in range(5)]
    straight = FedRefUpdater(3, 0.1, 0.3)
    straight.start(initial)
    current, outputs = initial, []
    for avg in averaged:
        current, _ = straight.update(avg, current)
        outputs.append(current)

    stopped = FedRefUpdater(3, 0.1, 0.3)  # a server that stops after round 3 and saved its buffer
    stopped.start(initial)
    current = initial
    for avg in averaged[:3]:
        current, _ = stopped.update(avg, current)
    run = tmp_path / "workspace" / "stopped-job"  # the stopped job's run folder in the server's workspace
    (run / "app_server").mkdir(parents=True)
    torch.save(to_tensors({**stopped.buffer.state(), "round": 2}), run / "fedref_reference_buffer.pt")
    torch.save({"model": to_tensors(current)}, run / "app_server" / "FL_global_model.pt")

    restarted = FedRefController(
        num_clients=2, num_rounds=2, buffer_size=3, lambda1=0.1, lambda2=0.3, resume_job="stopped-job"
    )
    start(restarted, tmp_path / "workspace")
    assert restarted.start_round == 3  # the buffer's round + 1, decided by the server
    assert restarted.persistor._start_from == str(run / "app_server" / "FL_global_model.pt")
    assert len(restarted.updater.buffer) == 3
    for got, want in zip(restarted.updater.buffer.models, stopped.buffer.models):
        np.testing.assert_array_equal(got["w"], want["w"])
    for avg, want in zip(averaged[3:], outputs[3:]):
        current, applied = restarted.updater.update(avg, current)
        assert applied
        np.testing.assert_allclose(current["w"], want["w"], rtol=1e-6)


def test_a_continued_run_goes_on_to_its_planned_rounds_and_its_report_covers_both_parts(tmp_path):
    from fedseg.app.artifacts import load_run

    workspace = tmp_path / "workspace"
    stopped_run(workspace, round_number=2, rounds=[0, 1, 2])  # killed after round 2 of 5
    controller = FedRefController(
        num_clients=2, num_rounds=5, buffer_size=2, resume_job="stopped-job", planned_rounds=5
    )  # the stopped job's num_rounds, as `fedseg resume` leaves it: planned_rounds decides
    start(controller, workspace)
    assert (controller.start_round, controller.num_rounds) == (3, 2)
    for round_number in range(controller.start_round, controller.start_round + controller.num_rounds):
        controller.current_round = round_number
        controller.write_round_record({"dice_mean": 0.5}, 2, True)  # what the server writes after each round

    run = load_run(controller.run_dir())
    assert run.server_dir == controller.run_dir()  # its own records, not the copy below resumed_from/
    assert [r["round"] for r in run.rounds] == [0, 1, 2, 3, 4]
    assert [r.get("resumed_from") for r in run.rounds] == ["stopped-job"] * 3 + [None] * 2
    copy = os.path.join(controller.run_dir(), "resumed_from", "stopped-job", "round_metrics.jsonl")
    assert open(copy).read() == open(workspace / "stopped-job" / "round_metrics.jsonl").read()


def test_a_round_is_recorded_only_once_its_checkpoint_is_saved(tmp_path):
    controller = start(FedRefController(num_clients=1, num_rounds=1, buffer_size=2), tmp_path)
    run = tmp_path / "this-job"
    app = run / "app_server"
    app.mkdir(parents=True)
    persistor = controller.persistor
    persistor.model = persistor.network()
    persistor._ckpt_save_path = str(app / "FL_global_model.pt")
    initial = {k: v.numpy() for k, v in persistor.model.state_dict().items()}
    controller.updater.start(initial)
    controller.current_round = 0
    seen = []
    record = controller.write_round_record

    def spy(*args):
        seen.append(sorted(p.name for p in run.rglob("*.pt")))
        record(*args)

    controller.write_round_record = spy
    controller._site_records = {"site-1": {}}
    controller._targets = ["site-1"]
    averaged = {k: v + 0.01 for k, v in initial.items()}
    controller.update_model(FLModel(params=dict(initial)), FLModel(params=averaged, meta={"nr_aggregated": 1}))
    # a server killed once the record is there leaves a run that resumes from that round
    assert seen == [["FL_global_model.pt", "fedref_reference_buffer.pt", "fedref_step.pt"]]


def test_resume_with_another_buffer_size_is_refused(tmp_path):
    updater = FedRefUpdater(2)
    updater.start({"w": np.zeros(2, np.float32)})
    (tmp_path / "old").mkdir()
    torch.save(to_tensors({**updater.buffer.state(), "round": 0}), tmp_path / "old" / "fedref_reference_buffer.pt")
    torch.save({"model": {}}, tmp_path / "old" / "FL_global_model.pt")
    controller = FedRefController(num_clients=2, num_rounds=1, buffer_size=3, resume_job="old")
    with pytest.raises(JobRefused, match=r"buffer_size = 3: run old saved a buffer of size 2"):
        start(controller, tmp_path)


def test_lambda2_schedule():
    controller = FedRefController(
        num_clients=2, num_rounds=10, lambda2=0.1, lambda2_factor=2.0, lambda2_every=3, lambda2_max=0.35
    )
    assert [controller.lambda2_at(r) for r in (0, 2, 3, 5, 6, 9)] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.35, 0.35])
    assert FedRefController(num_clients=2, num_rounds=2, lambda2=0.1).lambda2_at(50) == 0.1


@pytest.mark.parametrize(
    "update, reason",
    [
        (
            {"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)},
            "non-finite values (NaN or Inf) in w",
        ),
        (
            {"w": np.zeros((3, 2), np.float32), "b": np.array([np.inf, 0], np.float32)},
            "non-finite values (NaN or Inf) in b",
        ),
        ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, "shape of w is (2, 3), expected (3, 2)"),
        ({"w": np.zeros((3, 2), np.float32)}, "1 missing key(s), e.g. b"),
        ({"w": np.zeros((3, 2)), "b": np.zeros(2), "x": np.zeros(1)}, "1 unexpected key(s), e.g. x"),
        ({}, "empty update (no parameters)"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, None),
        ({"w": torch.full((3, 2), float("nan")), "b": torch.zeros(2)}, "non-finite values (NaN or Inf) in w"),
        ({"w": torch.zeros(3, 2), "b": torch.tensor([0.0, float("-inf")])}, "non-finite values (NaN or Inf) in b"),
        (
            {"w": torch.zeros(3, 2, dtype=torch.float16), "b": torch.tensor([float("inf"), 0.0], dtype=torch.float16)},
            "non-finite values (NaN or Inf) in b",
        ),
        ({"w": torch.zeros(2, 3), "b": torch.zeros(2)}, "shape of w is (2, 3), expected (3, 2)"),
        ({"w": np.zeros((3, 2), np.int64), "b": np.zeros(2, np.int32)}, None),
        ({"b": np.zeros(2, np.float32), "w": np.zeros((3, 2), np.float32)}, None),
        (None, "empty update (no parameters)"),
        ({"w": np.zeros((3, 2)), "x": np.zeros(1), "y": np.zeros(1)}, "1 missing key(s), e.g. b"),
        ({"w": np.zeros((3, 2)), "b": np.zeros(2), "x": np.zeros(1), "y": np.zeros(1)}, "2 unexpected key(s), e.g. x"),
    ],
)
def test_update_checks(update, reason):
    """numpy arrays and torch tensors alike: a site may send either."""
    reference = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    assert update_problem(update, reference) == reason


def test_an_update_of_parameters_that_require_grad_is_checked():
    # e.g. a site that sends dict(model.named_parameters()): numpy cannot read such tensors directly
    reference = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    good = {"w": torch.nn.Parameter(torch.zeros(3, 2)), "b": torch.nn.Parameter(torch.zeros(2))}
    assert update_problem(good, reference) is None
    bad = {"w": torch.nn.Parameter(torch.zeros(3, 2)), "b": torch.nn.Parameter(torch.tensor([0.0, float("nan")]))}
    assert update_problem(bad, reference) == "non-finite values (NaN or Inf) in b"


def test_the_first_bad_tensor_is_named():
    reference = {"a": np.zeros(2), "b": np.zeros(2), "c": np.zeros(2)}
    update = {"a": np.zeros(2), "b": torch.tensor([1.0, float("nan")]), "c": np.zeros(3)}
    assert update_problem(update, reference) == "non-finite values (NaN or Inf) in b"
    assert update_problem({"c": np.zeros(2)}, reference) == "2 missing key(s), e.g. a"


@pytest.mark.parametrize(
    "min_clients, rejected, enough",
    [
        (2, {}, True),
        (2, {"site-2": "NaN"}, False),
        (1, {"site-2": "NaN"}, True),
        (0, {"site-1": "x", "site-2": "y"}, False),
    ],
)
def test_a_round_needs_min_clients_accepted_updates_and_at_least_one(min_clients, rejected, enough):
    controller = FedRefController(num_clients=2, num_rounds=1, min_clients=min_clients)
    controller._site_records = {"site-1": {}, "site-2": {}}
    controller._rejected = dict(rejected)
    assert controller.enough_updates() is enough


@pytest.mark.parametrize(
    "value, plain",
    [
        (np.float32(2.5), 2.5),
        (torch.tensor(3.0), 3.0),
        (7, 7.0),
        (float("nan"), None),
        (float("inf"), None),
        ("x", "x"),
        (None, None),
        ([1, 2], "[1, 2]"),
    ],
)
def test_round_records_hold_json_safe_values(value, plain):
    assert _plain(value) == plain and type(_plain(value)) is type(plain)
