"""FedRef's MAP step and reference buffer against their properties (docs/design.md), computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

from fedseg.fedref import FedRefUpdater, ReferenceBuffer, is_float_tensor, map_step, reference_weights


def random_model(rng: np.random.Generator, scale: float = 1.0) -> dict:
    return {
        "conv.weight": rng.normal(size=(4, 3, 3)).astype(np.float32) * scale,
        "conv.bias": rng.normal(size=(4,)).astype(np.float32) * scale,
        "norm.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def fedavg(models: list[dict], weights: list[float]) -> dict:
    """Weighted mean through FLARE's own aggregation helper, as the controller's FedAvg does it."""
    helper = WeightedAggregationHelper()
    for i, (model, weight) in enumerate(zip(models, weights)):
        helper.add(data=model, weight=weight, contributor_name=f"site-{i}", contribution_round=0)
    return helper.get_result()


def run_rounds(updater: FedRefUpdater, initial: dict, rounds: list[tuple[list[dict], list[float]]]) -> list[dict]:
    """Globals produced by FedRef over several rounds of client models."""
    updater.start(initial)
    current, produced = initial, []
    for models, weights in rounds:
        current, _ = updater.update(fedavg(models, weights), current)
        produced.append(current)
    return produced


def test_map_step_matches_closed_form():
    rng = np.random.default_rng(0)
    bar, prev, ref = random_model(rng), random_model(rng), random_model(rng)
    out = map_step(bar, prev, ref, 0.3, 0.7)
    for key in ("conv.weight", "conv.bias"):
        expected = (bar[key].astype(np.float64) + 0.3 * prev[key] + 0.7 * ref[key]) / 2.0
        np.testing.assert_allclose(out[key], expected, rtol=1e-6, atol=1e-6)
        assert out[key].dtype == np.float32
    # integer buffers keep the FedAvg value
    assert out["norm.num_batches_tracked"] is bar["norm.num_batches_tracked"]


def test_map_step_minimises_the_objective():
    """The closed form is the minimiser: every small perturbation raises J."""
    rng = np.random.default_rng(1)
    models = [random_model(rng) for _ in range(3)]
    weights = np.array([3.0, 1.0, 2.0]) / 6.0
    prev, ref = random_model(rng), random_model(rng)
    lam1, lam2 = 0.2, 0.5
    bar = fedavg(models, list(weights))
    theta = map_step(bar, prev, ref, lam1, lam2)["conv.bias"].astype(np.float64)

    def objective(t):
        fit = sum(w * np.sum((t - m["conv.bias"]) ** 2) for w, m in zip(weights, models))
        return (
            0.5 * fit + lam1 / 2 * np.sum((t - prev["conv.bias"]) ** 2) + lam2 / 2 * np.sum((t - ref["conv.bias"]) ** 2)
        )

    best = objective(theta)
    for _ in range(20):
        assert objective(theta + rng.normal(scale=1e-2, size=theta.shape)) > best


def test_zero_lambdas_give_fedavg_exactly():
    rng = np.random.default_rng(2)
    initial = random_model(rng)
    rounds = [([random_model(rng) for _ in range(3)], [5.0, 2.0, 1.0]) for _ in range(5)]
    fedref = run_rounds(FedRefUpdater(buffer_size=2, lambda1=0.0, lambda2=0.0), initial, rounds)
    current = initial
    for (models, weights), got in zip(rounds, fedref):
        current = fedavg(models, weights)
        for key in current:
            np.testing.assert_array_equal(got[key], current[key])


def test_output_lies_between_inputs_elementwise():
    rng = np.random.default_rng(3)
    bar, prev, ref = random_model(rng), random_model(rng), random_model(rng)
    out = map_step(bar, prev, ref, 0.4, 1.3)
    for key in ("conv.weight", "conv.bias"):
        stacked = np.stack([bar[key], prev[key], ref[key]])
        assert np.all(out[key] >= stacked.min(axis=0) - 1e-6)
        assert np.all(out[key] <= stacked.max(axis=0) + 1e-6)


def test_shifting_every_model_shifts_the_output():
    rng = np.random.default_rng(4)
    initial = random_model(rng)
    rounds = [([random_model(rng) for _ in range(2)], [1.0, 3.0]) for _ in range(4)]
    c = np.float32(2.5)

    def shift(model):
        return {k: (v + c if np.issubdtype(v.dtype, np.floating) else v) for k, v in model.items()}

    base = run_rounds(FedRefUpdater(3, 0.1, 0.4), initial, rounds)
    moved = run_rounds(FedRefUpdater(3, 0.1, 0.4), shift(initial), [([shift(m) for m in ms], w) for ms, w in rounds])
    for a, b in zip(base, moved):
        np.testing.assert_allclose(b["conv.weight"], a["conv.weight"] + c, rtol=1e-5, atol=1e-5)


def test_client_order_and_common_weight_scale_do_not_matter():
    rng = np.random.default_rng(5)
    initial = random_model(rng)
    rounds = [([random_model(rng) for _ in range(4)], [4.0, 1.0, 2.0, 7.0]) for _ in range(4)]
    base = run_rounds(FedRefUpdater(2, 0.2, 0.3), initial, rounds)
    permuted = [([ms[i] for i in (3, 1, 0, 2)], [w[i] * 10.0 for i in (3, 1, 0, 2)]) for ms, w in rounds]
    other = run_rounds(FedRefUpdater(2, 0.2, 0.3), initial, permuted)
    for a, b in zip(base, other):
        np.testing.assert_allclose(a["conv.weight"], b["conv.weight"], rtol=1e-5, atol=1e-6)


def test_p1_reference_is_the_last_global_model():
    rng = np.random.default_rng(6)
    prev = random_model(rng)
    buffer = ReferenceBuffer(1)
    buffer.push(random_model(rng))
    buffer.push(prev)  # theta_r is the newest model in the buffer
    ref = buffer.reference_model()
    np.testing.assert_array_equal(ref["conv.weight"], prev["conv.weight"])
    bar = random_model(rng)
    updater = FedRefUpdater(1, 0.2, 0.3)
    updater.start(prev)
    out, applied = updater.update(bar, prev)
    assert applied
    np.testing.assert_allclose(out["conv.weight"], (bar["conv.weight"] + 0.5 * prev["conv.weight"]) / 1.5, rtol=1e-6)


def test_warm_up_is_fedavg_until_the_buffer_is_full():
    rng = np.random.default_rng(7)
    updater = FedRefUpdater(3, 0.5, 0.5)
    current = random_model(rng)
    updater.start(current)
    applied_flags = []
    for _ in range(4):
        bar = random_model(rng)
        new, applied = updater.update(bar, current)
        if not applied:
            np.testing.assert_array_equal(new["conv.weight"], bar["conv.weight"])
        applied_flags.append(applied)
        current = new
    assert applied_flags == [False, False, True, True]


def test_buffer_holds_at_most_p_copies():
    rng = np.random.default_rng(8)
    buffer = ReferenceBuffer(3)
    pushed = [random_model(rng) for _ in range(10)]
    for model in pushed:
        buffer.push(model)
    assert len(buffer) == 3
    # the last three, as copies (mutating the source does not change the buffer), floats only
    for stored, source in zip(buffer.models, pushed[-3:]):
        np.testing.assert_array_equal(stored["conv.weight"], source["conv.weight"])
        assert stored["conv.weight"] is not source["conv.weight"]
        assert "norm.num_batches_tracked" not in stored
    pushed[-1]["conv.weight"][:] = 99.0
    assert not np.any(buffer.models[-1]["conv.weight"] == 99.0)


def test_reference_weights():
    assert reference_weights(4) == [0.25] * 4
    assert reference_weights(3, "linear") == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    with pytest.raises(ValueError, match="unknown reference weighting"):
        reference_weights(2, "cubic")
    with pytest.raises(ValueError, match="empty"):
        reference_weights(0)


def test_buffer_state_round_trip_gives_the_same_next_global():
    rng = np.random.default_rng(9)
    initial = random_model(rng)
    rounds = [([random_model(rng) for _ in range(2)], [1.0, 1.0]) for _ in range(5)]
    straight = run_rounds(FedRefUpdater(3, 0.1, 0.2, "linear"), initial, rounds)

    first = FedRefUpdater(3, 0.1, 0.2, "linear")
    head = run_rounds(first, initial, rounds[:3])
    resumed = FedRefUpdater(3, 0.1, 0.2, "linear")
    resumed.buffer = ReferenceBuffer.from_state(first.buffer.state())
    current, tail = head[-1], []
    for models, weights in rounds[3:]:
        current, _ = resumed.update(fedavg(models, weights), current)
        tail.append(current)
    for a, b in zip(straight[3:], tail):
        np.testing.assert_allclose(a["conv.weight"], b["conv.weight"], rtol=1e-6)


def test_torch_tensors_are_supported():
    bar = {"w": torch.ones(3), "n": torch.tensor(4)}
    prev = {"w": torch.zeros(3), "n": torch.tensor(1)}
    out = map_step(bar, prev, {"w": torch.full((3,), 2.0)}, 1.0, 3.0)
    torch.testing.assert_close(out["w"], torch.full((3,), 1.4))  # (1 + 0 + 3 * 2) / 5
    assert out["n"] is bar["n"]


@pytest.mark.parametrize("make", [np.array, torch.tensor])
def test_the_step_keeps_the_fedavg_models_dtype(make):
    # a float16 average with float32 models around it (e.g. after a float16 transfer) stays float16
    bar = {"w": make([1.0, 2.0]).astype(np.float16) if make is np.array else make([1.0, 2.0], dtype=torch.float16)}
    prev = {"w": make([0.0, 0.0]).astype(np.float32) if make is np.array else make([0.0, 0.0], dtype=torch.float32)}
    out = map_step(bar, prev, prev, 0.5, 0.5)
    assert out["w"].dtype == bar["w"].dtype
    np.testing.assert_allclose(np.asarray(out["w"], dtype=np.float64), [0.5, 1.0])


def test_only_arrays_and_tensors_of_floats_are_moved():
    assert is_float_tensor(np.zeros(2, np.float32)) and is_float_tensor(torch.zeros(2))
    for value in (np.zeros(2, np.int64), torch.zeros(2, dtype=torch.int64), 0.5, [0.5], "w", None):
        assert not is_float_tensor(value), value
    out = map_step({"lr": 0.5, "w": np.ones(2)}, {"lr": 0.1, "w": np.zeros(2)}, {"lr": 0.1, "w": np.zeros(2)}, 1.0, 1.0)
    assert out["lr"] == 0.5  # a plain number keeps the FedAvg value


def test_map_step_refuses_either_negative_lambda():
    model = {"w": np.zeros(2)}
    for lam1, lam2 in ((-0.1, 0.1), (0.1, -0.1)):
        with pytest.raises(ValueError, match=f"^lambda1 and lambda2 must be >= 0, got {lam1}, {lam2}$"):
            map_step(model, model, model, lam1, lam2)


def test_negative_lambda_is_rejected():
    with pytest.raises(ValueError, match="lambda1 and lambda2"):
        FedRefUpdater(3, -0.1, 0.1)
    with pytest.raises(ValueError, match="buffer size"):
        ReferenceBuffer(0)


def test_reference_model_is_the_weighted_mean_of_all_p_buffered_models():
    rng = np.random.default_rng(10)
    models = [random_model(rng) for _ in range(4)]
    buffer = ReferenceBuffer(3)
    for model in models:
        buffer.push(model)  # the first drops out
    kept = [m["conv.weight"].astype(np.float64) for m in models[1:]]
    np.testing.assert_allclose(buffer.reference_model()["conv.weight"], sum(kept) / 3, rtol=1e-5, atol=1e-6)
    linear = (1 * kept[0] + 2 * kept[1] + 3 * kept[2]) / 6  # the newest weighs most
    np.testing.assert_allclose(buffer.reference_model("linear")["conv.weight"], linear, rtol=1e-5, atol=1e-6)
    assert set(buffer.reference_model()) == {"conv.weight", "conv.bias"}  # floating-point tensors only


def test_each_round_buffers_fedrefs_output_and_the_next_round_uses_it():
    """FedRef written out a second time, round by round, from the docs' definition: the buffer holds the
    last p broadcast global models (FedRef's outputs, not the FedAvg models), theta_ref is their mean."""
    rng = np.random.default_rng(11)
    p, lam1, lam2 = 2, 0.3, 0.6
    initial = random_model(rng)
    averaged = [random_model(rng) for _ in range(5)]
    updater = FedRefUpdater(p, lam1, lam2, variant="mean")
    updater.start(initial)
    broadcast = [initial["conv.bias"].astype(np.float64)]
    current = initial
    for bar in averaged:
        current, applied = updater.update(bar, current)
        assert applied == (len(broadcast) >= p)
        if applied:
            reference = sum(broadcast[-p:]) / p
            expected = (bar["conv.bias"] + lam1 * broadcast[-1] + lam2 * reference) / (1 + lam1 + lam2)
            assert not np.allclose(current["conv.bias"], bar["conv.bias"])
        else:
            expected = bar["conv.bias"]
        np.testing.assert_allclose(current["conv.bias"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(updater.buffer.models[-1]["conv.bias"], current["conv.bias"])
        broadcast.append(np.asarray(current["conv.bias"], dtype=np.float64))


def test_defaults_are_the_benchmarks_choice_trend_p3_lambda1_0_lambda2_0_3():
    updater = FedRefUpdater()
    assert (
        updater.buffer.capacity,
        updater.lambda1,
        updater.lambda2,
        updater.reference_weighting,
        updater.variant,
    ) == (3, 0.0, 0.3, "uniform", "trend")


def test_an_unknown_reference_weighting_is_refused_when_the_updater_is_made():
    with pytest.raises(ValueError, match="unknown reference weighting 'cubic'"):
        FedRefUpdater(3, 0.1, 0.1, "cubic")
    with pytest.raises(ValueError, match="^the reference buffer is empty$"):
        ReferenceBuffer(2).reference_model()


def test_torch_models_are_buffered_as_torch_copies():
    buffer = ReferenceBuffer(2)
    model = {"w": torch.ones(3), "steps": torch.tensor(5)}
    buffer.push(model)
    stored = buffer.models[-1]
    assert set(stored) == {"w"} and isinstance(stored["w"], torch.Tensor)
    model["w"].fill_(7.0)  # the site's tensor changes afterwards: the buffer keeps what it was given
    torch.testing.assert_close(stored["w"], torch.ones(3))


def test_start_only_seeds_an_empty_buffer():
    rng = np.random.default_rng(12)
    resumed = FedRefUpdater(3)
    resumed.buffer = ReferenceBuffer.from_state({"capacity": 3, "models": [random_model(rng)]})
    resumed.start(random_model(rng))  # a restarted server: its buffer came back, theta_0 is not pushed again
    assert len(resumed.buffer) == 1
    resumed.buffer.push(random_model(rng))
    resumed.start(random_model(rng))
    assert len(resumed.buffer) == 2


def test_update_without_start_buffers_the_previous_global_first():
    rng = np.random.default_rng(13)
    initial, bar = random_model(rng), random_model(rng)
    started, unstarted = FedRefUpdater(1, 0.2, 0.3), FedRefUpdater(1, 0.2, 0.3)
    started.start(initial)
    (a, _), (b, applied) = started.update(bar, initial), unstarted.update(bar, initial)
    assert applied
    np.testing.assert_array_equal(a["conv.weight"], b["conv.weight"])
    np.testing.assert_array_equal(unstarted.buffer.models[0]["conv.weight"], b["conv.weight"])
