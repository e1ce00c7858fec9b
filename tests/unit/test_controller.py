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
        controller.rounds.write({"dice_mean": 0.5}, 2, True, controller.round_extra())  # after each round

    run = load_run(controller.get_run_dir())
    assert run.server_dir == controller.get_run_dir()  # its own records, not the copy below resumed_from/
    assert [r["round"] for r in run.rounds] == [0, 1, 2, 3, 4]
    assert [r.get("resumed_from") for r in run.rounds] == ["stopped-job"] * 3 + [None] * 2
    copy = os.path.join(controller.get_run_dir(), "resumed_from", "stopped-job", "round_metrics.jsonl")
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
    record = controller.rounds.write

    def spy(*args):
        seen.append(sorted(p.name for p in run.rglob("*.pt")))
        record(*args)

    controller.rounds.write = spy
    controller.rounds.site_records = {"site-1": {}}
    controller.rounds.targets = ["site-1"]
    averaged = {k: v + 0.01 for k, v in initial.items()}
    controller.finish_round(FLModel(params=dict(initial)), FLModel(params=averaged, meta={"nr_aggregated": 1}))
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
    controller.rounds.site_records = {"site-1": {}, "site-2": {}}
    controller.rounds.rejected = dict(rejected)
    assert controller.rounds.enough_updates() is enough


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


# -- the aggregator: checks, and the same sums whatever order the updates arrive in ------------------------------
def site_update(rng, site: str, steps=2, metrics=True) -> FLModel:
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.abstract.fl_model import ParamsType

    return FLModel(
        params=model(rng),
        params_type=ParamsType.DIFF,
        metrics={"dice_mean": float(rng.random())} if metrics else None,
        meta={"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps},
    )


def average(aggregator, reference, updates, order) -> FLModel:
    aggregator.start_round(reference, 3)
    for i in order:
        aggregator.accept_model(updates[i])
    return aggregator.aggregate_model()


def test_the_average_is_the_same_bits_whatever_order_the_updates_arrive_in():
    from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

    from fedseg.aggregation import SiteOrderedAggregator

    rng = np.random.default_rng(1)
    updates = [site_update(rng, f"site-{i}", steps=s) for i, s in zip((3, 1, 2), (5, 1, 7))]
    reference = model(rng)
    results = [average(SiteOrderedAggregator(), reference, updates, order) for order in ([0, 1, 2], [2, 1, 0])]
    helper = WeightedAggregationHelper()  # FLARE's own sums, fed in site order
    for u in sorted(updates, key=lambda u: u.meta["client_name"]):
        helper.add(u.params, u.meta["NUM_STEPS_CURRENT_ROUND"], u.meta["client_name"], 3)
    expected = helper.get_result()
    for result in results:
        assert all(result.params[k].tobytes() == expected[k].tobytes() for k in expected)
        assert result.meta["nr_aggregated"] == 3 and result.current_round == 3
    assert results[0].metrics == results[1].metrics


@pytest.mark.parametrize("steps, weight", [(4, 4.0), (None, 1.0), (0, 1.0), (-3, 1.0), (True, 1.0), ("x", 1.0)])
def test_a_sites_weight_is_its_aggregation_weight_times_its_steps_as_in_fedavg(steps, weight):
    from fedseg.aggregation import SiteOrderedAggregator

    update = site_update(np.random.default_rng(0), "site-1", steps=steps)
    assert SiteOrderedAggregator(aggregation_weights={"site-1": 0.5}).weight("site-1", update) == 0.5 * weight
    assert SiteOrderedAggregator(aggregation_weights={"site-2": 0.5}).weight("site-1", update) == weight


def test_a_rejected_update_is_not_averaged_and_a_site_without_metrics_drops_the_round_metrics():
    from fedseg.aggregation import SiteOrderedAggregator

    rng = np.random.default_rng(2)
    reference = model(rng)
    good, silent = site_update(rng, "site-1"), site_update(rng, "site-2", metrics=False)
    bad = site_update(rng, "site-3")
    bad.params["w"] = np.full((3, 2), np.nan, np.float32)
    aggregator = SiteOrderedAggregator()
    aggregator.start_round(reference, 0)
    assert [aggregator.accept_model(u) for u in (bad, good, silent)] == [False, True, True]
    assert aggregator.rejected == {"site-3": "non-finite values (NaN or Inf) in w"}
    result = aggregator.aggregate_model()
    assert result.meta["nr_aggregated"] == 2 and result.metrics is None
    np.testing.assert_allclose(result.params["w"], (good.params["w"] + silent.params["w"]) / 2, rtol=1e-6)
    assert aggregator.accepted() == [] and aggregator.rejected == {}  # the next round starts empty


def test_a_new_aggregation_rule_is_a_subclass_that_weighs_the_sites():
    from fedseg.aggregation import SiteOrderedAggregator

    class OnlySiteOne(SiteOrderedAggregator):
        def weight(self, site, result):
            return 1.0 if site == "site-1" else 1e-12

    rng = np.random.default_rng(3)
    updates = [site_update(rng, "site-1"), site_update(rng, "site-2")]
    result = average(OnlySiteOne(), model(rng), updates, [1, 0])
    np.testing.assert_allclose(result.params["w"], updates[0].params["w"], rtol=1e-6)


# -- the round: what is sent, in which order, and what a round needs -------------------------------------------
class Sent(list):
    """Stands in for FLARE's broadcast_model: the tasks a controller sends, in order."""

    def __call__(self, **task):
        self.append(task)


def test_the_sites_left_out_are_asked_to_validate_before_the_training_task_goes_out(tmp_path):
    from fedseg.controller import RecordingFedAvg

    ctl = start(RecordingFedAvg(num_clients=3, num_rounds=1, min_clients=2, clients_per_round=2), tmp_path)
    ctl.broadcast_model = sent = Sent()
    ctl.current_round = 0
    ctl.rounds.all_sites = ["site-1", "site-2", "site-3"]
    ctl.send_round(FLModel(params=model(np.random.default_rng(0))), ["site-1", "site-3"])
    assert [(t["task_name"], t["targets"]) for t in sent] == [("validate", ["site-2"]), ("train", ["site-1", "site-3"])]
    validate, train = sent
    assert (train["min_responses"], train["wait_time_after_min_received"], train["blocking"]) == (2, 60, False)
    assert (
        validate["data"].params is train["data"].params and validate["callback"] == ctl.rounds.record_absent_validation
    )
    assert train["callback"] == ctl.receive_update


def test_scaffold_sends_its_blocking_training_task_with_the_same_wait(tmp_path):
    from fedseg.controller import RecordingScaffold

    ctl = start(RecordingScaffold(num_clients=3, num_rounds=1, min_clients=5, wait_after_min_seconds=7), tmp_path)
    ctl.broadcast_model = sent = Sent()
    ctl.current_round = 0
    ctl.send_model_and_wait(targets=["site-1", "site-2"], data=FLModel(params=model(np.random.default_rng(0))))
    ((task),) = sent
    assert (task["min_responses"], task["wait_time_after_min_received"], task["blocking"]) == (2, 7, True)
    assert ctl.rounds.targets == ["site-1", "site-2"]


def test_a_round_with_too_few_good_updates_keeps_the_global_model_and_says_so(tmp_path):
    from nvflare.app_common.abstract.fl_model import ParamsType

    from fedseg.controller import RecordingFedAvg

    ctl = start(RecordingFedAvg(num_clients=2, num_rounds=1, min_clients=2), tmp_path)
    (tmp_path / "this-job").mkdir()
    saved, errors = [], []
    ctl.save_model, ctl.error = saved.append, errors.append
    ctl.current_round = 0
    rng = np.random.default_rng(4)
    initial = FLModel(params=model(rng), params_type=ParamsType.FULL)
    ctl.start_training_round(["site-1", "site-2"], initial)
    bad = site_update(rng, "site-2")
    bad.params["b"] = np.zeros(5, np.float32)
    assert [ctl.receive_update(u) for u in (site_update(rng, "site-1"), bad)] == [True, False]
    result = ctl.aggregate_round()
    kept = ctl.finish_round(initial, result)
    assert kept is initial and result.meta == {"nr_aggregated": 0} and saved == [initial]
    assert errors == [
        "round 0: update from site-2 rejected: shape of b is (5,), expected (2,)",
        "round 0: fewer than 2 acceptable updates; the global model is kept unchanged",
    ]
    (record,) = load_records(tmp_path / "this-job" / "round_metrics.jsonl")
    assert (record["global_updated"], record["nr_aggregated"], sorted(record["sites"])) == (
        False,
        0,
        ["site-1", "site-2"],
    )
    assert record["rejected"] == {"site-2": "shape of b is (5,), expected (2,)"} and record["missing"] == []


def load_records(path) -> list[dict]:
    import json

    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_with_a_stop_condition_only_a_better_model_is_saved_and_the_run_stops_once_it_is_met(tmp_path):
    from nvflare.app_common.abstract.fl_model import ParamsType

    from fedseg.controller import RecordingFedAvg

    ctl = start(RecordingFedAvg(num_clients=1, num_rounds=3, stop_cond="dice_mean >= 0.8"), tmp_path)
    (tmp_path / "this-job").mkdir()
    saved = []
    ctl.save_model = lambda m: saved.append(m.metrics["dice_mean"])  # FedAvg's update changes the model in place
    rng = np.random.default_rng(5)
    global_model = FLModel(params=model(rng), params_type=ParamsType.FULL)
    stops = []
    for round_number, dice in enumerate((0.5, 0.4, 0.9)):
        ctl.current_round = round_number
        ctl.start_training_round(["site-1"], global_model)
        update = site_update(rng, "site-1")
        update.metrics = {"dice_mean": dice}
        ctl.receive_update(update)
        before = list(saved)
        global_model = ctl.finish_round(global_model, ctl.aggregate_round())
        assert saved == before  # finish_round saves nothing with a stop condition
        stops.append(ctl.keep_best_or_stop(global_model))
    assert stops == [False, False, True] and saved == [0.5, 0.9]
