"""FedRef's variants (trend, diagonal, momentum) against their stated properties, computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.fedref import (
    FedRefUpdater,
    ReferenceBuffer,
    diagonal_shares,
    diagonal_step,
    site_disagreement,
    step_ratio,
    trend_coefficients,
)


def model(rng: np.random.Generator, scale: float = 1.0) -> dict:
    return {
        "conv.weight": (rng.normal(size=(4, 3)) * scale).astype(np.float32),
        "conv.bias": (rng.normal(size=(4,)) * scale).astype(np.float32),
        "norm.num_batches_tracked": np.array(3, dtype=np.int64),
    }


def weighted_mean(sites: list[tuple[float, dict]]) -> dict:
    total = sum(w for w, _ in sites)
    out = {k: sum(w * m[k].astype(np.float64) for w, m in sites) / total for k in ("conv.weight", "conv.bias")}
    return {
        **{k: v.astype(np.float32) for k, v in out.items()},
        "norm.num_batches_tracked": sites[0][1]["norm.num_batches_tracked"],
    }


def rounds_of(updater: FedRefUpdater, initial: dict, site_rounds: list[list[tuple[float, dict]]]) -> list[dict]:
    updater.start(initial)
    current, out = initial, []
    for sites in site_rounds:
        current, _ = updater.update(weighted_mean(sites), current, sites)
        out.append(current)
    return out


def random_rounds(rng, count: int = 5, sites: int = 3) -> list[list[tuple[float, dict]]]:
    return [[(float(rng.integers(1, 9)), model(rng)) for _ in range(sites)] for _ in range(count)]


def test_trend_coefficients_fit_a_line_one_round_ahead():
    assert trend_coefficients(3) == pytest.approx([-2 / 3, 1 / 3, 4 / 3])  # (4 B3 + B2 - 2 B1) / 3
    assert trend_coefficients(1) == [1.0]
    for p in (2, 3, 4, 5, 7):
        c = np.array(trend_coefficients(p))
        t = np.arange(1, p + 1)
        # a line a + b t through the buffer is predicted exactly at t = p + 1
        assert c.sum() == pytest.approx(1.0)
        assert c @ (0.3 + 2.0 * t) == pytest.approx(0.3 + 2.0 * (p + 1))


@pytest.mark.parametrize("variant", ["mean", "trend", "diagonal"])
def test_zero_weights_give_fedavg_exactly(variant):
    rng = np.random.default_rng(0)
    initial, site_rounds = model(rng), random_rounds(rng)
    got = rounds_of(FedRefUpdater(3, 0.0, 0.0, variant=variant), initial, site_rounds)
    for sites, out in zip(site_rounds, got):
        for key, value in weighted_mean(sites).items():
            np.testing.assert_array_equal(out[key], value)


@pytest.mark.parametrize("variant", ["mean", "trend", "diagonal"])
def test_variants_are_shift_equivariant(variant):
    rng = np.random.default_rng(1)
    initial, site_rounds = model(rng), random_rounds(rng)
    c = np.float32(3.0)

    def shift(m):
        return {k: (v + c if np.issubdtype(v.dtype, np.floating) else v) for k, v in m.items()}

    base = rounds_of(FedRefUpdater(3, 0.1, 0.5, variant=variant), initial, site_rounds)
    moved = rounds_of(
        FedRefUpdater(3, 0.1, 0.5, variant=variant),
        shift(initial),
        [[(w, shift(m)) for w, m in sites] for sites in site_rounds],
    )
    for a, b in zip(base, moved):
        np.testing.assert_allclose(b["conv.weight"], a["conv.weight"] + c, rtol=1e-5, atol=1e-4)


def test_trend_passes_a_steady_drift_undamped_and_mean_damps_it():
    drift = {"conv.weight": np.full((4, 3), 0.5, np.float32), "conv.bias": np.full(4, -0.2, np.float32)}
    for variant, expected_ratio in (("trend", 1.0), ("mean", None)):
        updater = FedRefUpdater(3, 0.0, 0.5, variant=variant)
        current = {k: np.zeros_like(v) for k, v in drift.items()}
        updater.start(current)
        ratios = []
        for _ in range(8):  # every round the sites propose theta_r + d
            proposal = {k: current[k] + drift[k] for k in drift}
            current, applied = updater.update(proposal, current)
            if applied:
                ratios.append(updater.last_step_ratio)
        if expected_ratio is not None:
            assert ratios == pytest.approx([1.0] * len(ratios), abs=1e-6)
        else:  # the mean of the buffer lags behind: every applied step is shorter than the sites' proposal
            assert all(r < 0.9 for r in ratios)


def test_trend_damps_an_oscillation():
    """Sites that flip the model's sign every round: FedAvg keeps the amplitude, trend shrinks it."""
    updater = FedRefUpdater(3, 0.0, 0.5, variant="trend")
    current = {"w": np.array([1.0], np.float32)}
    updater.start(current)
    amplitudes = []
    for _ in range(12):
        current, _ = updater.update({"w": -current["w"]}, current)
        amplitudes.append(abs(float(current["w"][0])))
    assert amplitudes[:2] == pytest.approx([1.0, 1.0])  # warm-up: FedAvg
    assert amplitudes[-1] < 0.5 * amplitudes[2]


def test_diagonal_pulls_only_where_sites_disagree_and_the_past_was_stable():
    stable = {"a": np.zeros(5), "b": np.zeros(5)}
    buffer = ReferenceBuffer(3)
    for step in range(3):  # layer a stood still, layer b moved by 1 every round
        buffer.push({"a": stable["a"], "b": stable["b"] + step})
    averaged = {"a": np.full(5, 0.2), "b": np.full(5, 3.0)}
    sites = [(1.0, {"a": np.full(5, -0.8), "b": np.full(5, 3.0)}), (1.0, {"a": np.full(5, 1.2), "b": np.full(5, 3.0)})]
    v = site_disagreement(sites, averaged)
    assert v == pytest.approx({"a": 1.0, "b": 0.0})
    shares = diagonal_shares(v, buffer.layer_variance(), lambda2=1.0, alpha_max=0.5)
    assert shares["a"] == pytest.approx(0.5)  # capped: the sites disagree and a was stable
    assert shares["b"] == 0.0  # the sites agree: FedAvg's value stands
    out = diagonal_step(averaged, buffer.trend_model(), shares)
    np.testing.assert_allclose(out["a"], 0.1)  # halfway from 0.2 to the trend's 0
    np.testing.assert_array_equal(out["b"], averaged["b"])


def test_diagonal_is_a_convex_combination_of_fedavg_and_the_trend():
    rng = np.random.default_rng(2)
    updater = FedRefUpdater(3, 0.0, 2.0, variant="diagonal", alpha_max=0.8)
    initial, site_rounds = model(rng), random_rounds(rng, count=6)
    updater.start(initial)
    current = initial
    for sites in site_rounds:
        averaged = weighted_mean(sites)
        centre = updater.buffer.trend_model() if updater.buffer.is_full else None
        new, applied = updater.update(averaged, current, sites)
        if applied:
            for key in ("conv.weight", "conv.bias"):
                low = np.minimum(averaged[key], centre[key]) - 1e-5
                high = np.maximum(averaged[key], centre[key]) + 1e-5
                assert np.all((new[key] >= low) & (new[key] <= high))
            assert 0 < max(updater.last_shares.values()) <= 0.8
        current = new


def test_diagonal_without_site_models_is_refused():
    updater = FedRefUpdater(1, 0.0, 1.0, variant="diagonal")
    updater.start({"w": np.zeros(2)})
    with pytest.raises(ValueError, match="site models"):
        updater.update({"w": np.ones(2)}, {"w": np.zeros(2)})


def test_momentum_zero_is_today_and_momentum_accelerates_a_drift():
    rng = np.random.default_rng(3)
    initial, site_rounds = model(rng), random_rounds(rng)
    plain = rounds_of(FedRefUpdater(3, 0.1, 0.1), initial, site_rounds)
    zero = rounds_of(FedRefUpdater(3, 0.1, 0.1, momentum=0.0), initial, site_rounds)
    for a, b in zip(plain, zero):
        np.testing.assert_array_equal(a["conv.weight"], b["conv.weight"])
    updater = FedRefUpdater(3, 0.0, 0.0, momentum=0.5)
    current = {"w": np.zeros(1)}
    updater.start(current)
    for _ in range(10):
        current, _ = updater.update({"w": current["w"] + 1.0}, current)
    assert updater.last_step_ratio == pytest.approx(2.0, rel=1e-2)  # 1 / (1 - beta)


def test_step_ratio_reads_the_damping():
    prev = {"w": torch.zeros(4), "n": torch.tensor(2)}
    averaged = {"w": torch.full((4,), 2.0), "n": torch.tensor(3)}
    assert step_ratio({"w": torch.full((4,), 1.5), "n": torch.tensor(3)}, averaged, prev) == pytest.approx(0.75)
    assert step_ratio(averaged, averaged, prev) == pytest.approx(1.0)
    assert step_ratio(prev, prev, prev) is None


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown FedRef variant"):
        FedRefUpdater(3, variant="cubic")
