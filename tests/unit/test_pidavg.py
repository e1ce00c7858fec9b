"""FedPIDAvg's weights (fedseg.pidavg) against their properties, its aggregator, and its controller's rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.server_fakes import start
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedseg.aggregation import SiteOrderedAggregator
from fedseg.controller import RecordingFedPIDAvg
from fedseg.pidavg import PIDAggregator, PIDRule, loss_drop, loss_integral, mix, usable
from fedseg.server_config import JobRefused, ServerConfig

SITES = ["site-1", "site-2", "site-3", "site-4"]


def random_round(rng, sites=SITES) -> tuple[dict, dict, dict]:
    """(sizes, losses, histories) of a round: some sites with no history, histories of different lengths."""
    sizes = {s: int(rng.integers(1, 200)) for s in sites}
    losses = {s: float(rng.uniform(0.05, 2.0)) for s in sites}
    history = {s: list(rng.uniform(0.05, 2.0, size=int(rng.integers(0, 8)))) for s in sites}
    return sizes, losses, history


def weights_of(rule: PIDRule, sizes, losses, history) -> dict[str, float]:
    return rule.weights(rule.inputs(sizes, losses, history))


# -- the weights' properties -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_without_the_loss_terms_the_weights_are_fedavg_s_data_shares(seed):
    sizes, losses, history = random_round(np.random.default_rng(seed))
    weights = weights_of(PIDRule(1.0, 0.0, 0.0), sizes, losses, history)
    total = sum(sizes.values())
    assert weights == pytest.approx({s: n / total for s, n in sizes.items()}, rel=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_the_weights_are_non_negative_and_sum_to_one_whatever_the_sites_report(seed):
    rng = np.random.default_rng(seed)
    sizes, losses, history = random_round(rng)
    bad = [float("nan"), float("inf"), -1.0, None, "7", True]
    for site in rng.choice(SITES, size=2, replace=False):  # two sites report something unusable
        sizes[site] = bad[int(rng.integers(len(bad)))]
        losses[site] = bad[int(rng.integers(len(bad)))]
    for rule in (PIDRule(), PIDRule(0.2, 0.3, 0.5, window=2), PIDRule(0.0, 1.0, 0.0)):
        weights = weights_of(rule, sizes, losses, history)
        assert sorted(weights) == SITES and all(np.isfinite(w) and w >= 0 for w in weights.values())
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)


def test_the_site_whose_loss_fell_more_weighs_more_all_else_equal():
    # same data size, same loss now, the same losses before but the last one: site-1's fell from 1.0, site-2's from 0.9
    sizes, losses = {"site-1": 50, "site-2": 50}, {"site-1": 0.6, "site-2": 0.6}
    history = {"site-1": [1.0, 1.0], "site-2": [1.0, 0.9]}
    for rule in (PIDRule(0.45, 0.55, 0.0), PIDRule()):
        weights = weights_of(rule, sizes, losses, history)
        assert weights["site-1"] > weights["site-2"]
    # with the drop term off, only the integral separates them (site-1's recent losses are higher)
    no_drop = weights_of(PIDRule(0.5, 0.0, 0.5), sizes, losses, history)
    assert no_drop["site-1"] > no_drop["site-2"]
    equal = weights_of(PIDRule(1.0, 0.0, 0.0), sizes, losses, history)
    assert equal["site-1"] == equal["site-2"]


def test_the_formula_term_by_term():
    sizes = {"site-1": 10, "site-2": 30}
    history = {"site-1": [1.0, 0.8], "site-2": [1.2]}
    losses = {"site-1": 0.5, "site-2": 1.0}
    k = {"site-1": 0.3, "site-2": 0.2}
    m = {"site-1": (1.0 + 0.8 + 0.5) / 3, "site-2": (1.2 + 1.0) / 2}
    expected = {
        s: 0.45 * sizes[s] / 40 + 0.45 * k[s] / 0.5 + 0.1 * m[s] / sum(m.values()) for s in ("site-1", "site-2")
    }
    assert weights_of(PIDRule(), sizes, losses, history) == pytest.approx(expected, rel=1e-12)


def test_a_rising_loss_gets_no_drop_share_never_a_negative_weight():
    assert loss_drop([0.5], 0.9) == 0.0 and loss_drop([0.9], 0.5) == pytest.approx(0.4)
    weights = weights_of(PIDRule(0.0, 1.0, 0.0), {"a": 1, "b": 1}, {"a": 0.9, "b": 0.4}, {"a": [0.5], "b": [0.5]})
    assert weights == {"a": 0.0, "b": 1.0}


def test_in_the_first_round_the_drop_term_is_left_out_and_the_others_rescaled():
    sizes, losses = {"site-1": 10, "site-2": 30}, {"site-1": 1.0, "site-2": 0.5}
    weights = weights_of(PIDRule(), sizes, losses, {})
    expected = {s: (0.45 * sizes[s] / 40 + 0.1 * losses[s] / 1.5) / 0.55 for s in sizes}
    assert weights == pytest.approx(expected, rel=1e-12)
    # no loss fell anywhere later on: the same rule (K = 0)
    assert weights_of(PIDRule(), sizes, losses, {"site-1": [0.2], "site-2": [0.1]}) == pytest.approx(expected)


def test_with_no_term_that_can_be_formed_the_weights_are_equal():
    weights = weights_of(PIDRule(), {"a": None, "b": -3}, {"a": float("nan"), "b": None}, {})
    assert weights == {"a": 0.5, "b": 0.5}
    assert mix([(0.0, {"a": 1.0, "b": 3.0}), (1.0, {"a": 0.0, "b": 0.0})], ["a", "b"]) == {"a": 0.5, "b": 0.5}


def test_the_integral_is_the_mean_of_the_last_window_losses_this_round_s_included():
    assert loss_integral([9.0, 1.0, 2.0], 3.0, window=3) == pytest.approx(2.0)
    assert loss_integral([1.0], 3.0, window=6) == pytest.approx(2.0)  # a short history: the mean of what there is
    assert loss_integral([5.0, 5.0], 3.0, window=1) == 3.0
    assert loss_integral([5.0], None, window=6) == 0.0


def test_the_history_keeps_what_the_next_round_needs_and_never_a_bad_loss():
    rule, history = PIDRule(window=3), {}
    for round_losses in ({"a": 1.0, "b": 2.0}, {"a": 0.9}, {"a": 0.8, "b": None}, {"a": 0.7}):
        rule.remember(history, round_losses)
    assert history == {"a": [0.8, 0.7], "b": [2.0]}  # window 3: two earlier losses; b was absent, then bad
    # b's next drop is measured from the last loss it reported, however long ago
    assert rule.inputs({"b": 10}, {"b": 1.5}, history)["b"]["drop"] == pytest.approx(0.5)
    rule_1 = PIDRule(window=1)
    rule_1.remember(history, {"a": 0.6})
    assert history["a"] == [0.6]  # window 1 still keeps the last loss, for the drop


@pytest.mark.parametrize(
    "value, found", [(3, 3.0), (0.0, 0.0), (np.float32(0.5), 0.5), (-0.1, None), (float("nan"), None)]
)
def test_only_a_finite_non_negative_number_is_usable(value, found):
    assert usable(value) == found
    assert usable(True) is None and usable("1") is None and usable(None) is None and usable([1]) is None


@pytest.mark.parametrize(
    "values, message",
    [
        ((0.5, 0.45, 0.1, 6), r"pid_alpha \+ pid_beta \+ pid_gamma = 1.05: must be 1"),
        ((1.2, -0.2, 0.0, 6), r"pid_alpha = 1.2: must be in \[0.0, 1.0\]"),
        ((0.45, float("nan"), 0.1, 6), r"pid_beta = nan: must be a finite number"),
        ((0.45, 0.45, "0.1", 6), r"pid_gamma = '0.1': must be a finite number"),
        ((0.45, 0.45, 0.1, 0), r"pid_window = 0: must be in \[1, 64\]"),
        ((0.45, 0.45, 0.1, 6.0), r"pid_window = 6.0: must be an integer"),
    ],
)
def test_constants_out_of_their_range_are_refused_with_one_line(values, message):
    with pytest.raises(JobRefused, match=message):
        PIDRule.checked(*values)
    with pytest.raises(JobRefused, match=message):
        RecordingFedPIDAvg(
            num_clients=2, num_rounds=1, **dict(zip(("pid_alpha", "pid_beta", "pid_gamma", "pid_window"), values))
        )


# -- the aggregator ---------------------------------------------------------------------------------------------
def params(rng) -> dict:
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}


def update(rng, site, loss=0.5, size=10, steps=2) -> FLModel:
    return FLModel(
        params=params(rng),
        params_type=ParamsType.DIFF,
        metrics={"dice_mean": float(rng.random()), "train_loss": loss, "n_train_cases": size},
        meta={"client_name": site, "NUM_STEPS_CURRENT_ROUND": steps},
    )


def aggregate(aggregator, reference, updates, order, round_number=0) -> FLModel:
    aggregator.start_round(reference, round_number)
    for i in order:
        aggregator.accept_model(updates[i])
    return aggregator.aggregate_model()


def test_without_the_loss_terms_the_average_is_site_ordered_fedavg_with_data_size_weights():
    rng = np.random.default_rng(0)
    sizes = {"site-1": 12, "site-2": 40, "site-3": 7}
    updates = [update(rng, s, loss=float(rng.random()), size=n, steps=1) for s, n in sizes.items()]
    reference = params(rng)
    pid = aggregate(PIDAggregator(PIDRule(1.0, 0.0, 0.0)), reference, updates, [2, 0, 1])
    fedavg = aggregate(SiteOrderedAggregator(aggregation_weights=sizes), reference, updates, [0, 1, 2])
    for key in reference:
        np.testing.assert_allclose(pid.params[key], fedavg.params[key], rtol=1e-6, atol=1e-7)
    assert pid.metrics == pytest.approx(fedavg.metrics)


def test_the_average_is_the_same_bits_whatever_order_the_updates_arrive_in_and_weighs_as_recorded():
    rng = np.random.default_rng(1)
    updates = [update(rng, f"site-{i}", loss=0.3 * i, size=10 * i) for i in (1, 2, 3)]
    reference = params(rng)
    one, two = PIDAggregator(PIDRule()), PIDAggregator(PIDRule())
    for round_number in range(3):  # the same histories build up in both
        a = aggregate(one, reference, updates, [0, 1, 2], round_number)
        b = aggregate(two, reference, updates, [2, 1, 0], round_number)
        assert all(a.params[k].tobytes() == b.params[k].tobytes() for k in reference)
    weights = one.last_round["weights"]
    assert sum(weights.values()) == pytest.approx(1.0)
    expected = sum(weights[u.meta["client_name"]] * u.params["w"].astype(np.float64) for u in updates)
    np.testing.assert_allclose(a.params["w"], expected, rtol=1e-5, atol=1e-6)
    info = a.meta["metrics_aggregation_info"]
    assert "FedPIDAvg" in info["aggregation"]["weight_formula"]
    assert {s["name"]: s["weight"] for s in info["site_weights"]} == weights


def test_a_rejected_update_is_not_weighed_and_its_loss_not_kept():
    rng = np.random.default_rng(2)
    aggregator = PIDAggregator(PIDRule())
    reference = params(rng)
    good, bad = update(rng, "site-1", loss=0.4), update(rng, "site-2", loss=0.1)
    bad.params["w"] = np.full((3, 2), np.nan, np.float32)
    aggregator.start_round(reference, 0)
    assert [aggregator.accept_model(u) for u in (good, bad)] == [True, False]
    aggregator.aggregate_model()
    assert aggregator.last_round["weights"] == {"site-1": 1.0}
    assert aggregator.history == {"site-1": [0.4]}


def test_a_site_reporting_a_nan_loss_keeps_its_data_share_and_poisons_nothing():
    rng = np.random.default_rng(3)
    aggregator, warnings = PIDAggregator(PIDRule()), []
    aggregator.warning = warnings.append
    reference = params(rng)
    aggregate(aggregator, reference, [update(rng, "site-1", 1.0, 10), update(rng, "site-2", 1.0, 10)], [0, 1])
    result = aggregate(
        aggregator, reference, [update(rng, "site-1", 0.5, 10), update(rng, "site-2", float("nan"), 10)], [0, 1], 1
    )
    weights, inputs = aggregator.last_round["weights"], aggregator.last_round["inputs"]
    assert inputs["site-2"] == {"size": 10.0, "loss": None, "drop": 0.0, "integral": 0.0}
    # site-2: only its data share; site-1: its data share, every drop share and every integral share
    assert weights == pytest.approx({"site-1": 0.45 * 0.5 + 0.45 + 0.1, "site-2": 0.45 * 0.5})
    assert all(np.isfinite(v).all() for v in result.params.values())
    assert aggregator.history == {"site-1": [1.0, 0.5], "site-2": [1.0]}
    assert warnings == [
        "round 1: site-2 reported train_loss = nan, not a finite non-negative number: no FedPIDAvg share that needs it this round"
    ]
    json.dumps(aggregator.last_round, allow_nan=False)  # the round record stays valid JSON


# -- the controller, through the fake server ----------------------------------------------------------------------
def test_a_few_rounds_update_the_model_with_the_recorded_weights(tmp_path):
    ctl = start(RecordingFedPIDAvg(num_clients=2, num_rounds=3, min_clients=2), tmp_path)
    (tmp_path / "this-job").mkdir()
    ctl.save_model = lambda model: None
    rng = np.random.default_rng(4)
    global_model = FLModel(params=params(rng), params_type=ParamsType.FULL)
    sizes, losses = {"site-1": 8, "site-2": 24}, {"site-1": [1.2, 0.9, 0.85], "site-2": [1.0, 0.95, 0.6]}
    for round_number in range(3):
        ctl.current_round = round_number
        before = {k: v.astype(np.float64) for k, v in global_model.params.items()}
        ctl.start_training_round(["site-1", "site-2"], global_model)
        sent = {s: update(rng, s, losses[s][round_number], sizes[s]) for s in sizes}
        assert all(ctl.receive_update(u) for u in sent.values())
        global_model = ctl.finish_round(global_model, ctl.aggregate_round())
        weights = ctl.site_aggregator.last_round["weights"]
        step = sum(weights[s] * sent[s].params["w"].astype(np.float64) for s in sizes)
        np.testing.assert_allclose(global_model.params["w"], before["w"] + step, rtol=1e-5, atol=1e-6)
    records = [json.loads(line) for line in open(tmp_path / "this-job" / "round_metrics.jsonl")]
    assert [r["algorithm"] for r in records] == ["fedpidavg"] * 3
    first, second, third = (r["fedpidavg"] for r in records)
    assert (first["alpha"], first["beta"], first["gamma"], first["window"]) == (0.45, 0.45, 0.1, 6)
    assert first["weights"] == pytest.approx(
        {s: (0.45 * sizes[s] / 32 + 0.1 * losses[s][0] / 2.2) / 0.55 for s in sizes}
    )  # no drop yet
    assert second["inputs"]["site-1"]["drop"] == pytest.approx(0.3)
    assert third["weights"]["site-2"] > third["weights"]["site-1"]  # site-2's loss fell most in round 2
    for record in (first, second, third):
        assert sum(record["weights"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(fedprox_mu=0.1), r"^fedprox_mu = 0.1: only the fedprox controller sends a proximal term"),
        (dict(aggregation_weights={"site-1": 2.0}), r"^aggregation_weights: FedPIDAvg weighs each site"),
        (dict(algorithm_name="fedavg"), r"^algorithm_name = 'fedavg': this controller's settings run 'fedpidavg'"),
    ],
)
def test_the_controller_refuses_what_fedpidavg_does_not_do(tmp_path, overrides, message):
    with pytest.raises(JobRefused, match=message):
        start(RecordingFedPIDAvg(num_clients=2, num_rounds=1, **overrides), tmp_path)


def test_a_server_may_leave_fedpidavg_out(tmp_path):
    assert "fedpidavg" in ServerConfig().algorithms
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "fedseg_server.json").write_text(json.dumps({"algorithms": ["fedavg"]}))
    with pytest.raises(JobRefused, match=r"^algorithm 'fedpidavg' is not allowed on this server"):
        start(RecordingFedPIDAvg(num_clients=2, num_rounds=1), tmp_path)
