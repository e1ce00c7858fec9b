"""The FeTS Challenge Task 1 regime: the published tables, the simulated clock, the convergence score, the
collaborator-selection policies and partitioning_2's sizes (fedseg.fets_challenge)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.commands import REPO_ROOT

from fedseg import fets_challenge as fc

PARTITIONING_2 = os.path.join(REPO_ROOT, "tests", "data", "fets2022", "partitioning_2.csv")
WEEK = 7 * 24 * 3600


@pytest.fixture(scope="module")
def federation():
    """partitioning_2 as the source runs it: names in its order, its 80/20 split, its timing seed."""
    sizes = fc.partition_sizes(PARTITIONING_2)
    names = [str(p) for p in fc.source_order(list(sizes))]
    cases = {str(p): fc.source_split(n) for p, n in sizes.items()}
    return names, cases, fc.collaborator_timings(names)


# -- the tables ---------------------------------------------------------------------------------------------------
def test_the_tables_have_the_published_shapes():
    assert len(fc.TRAINING_SECONDS_PER_CASE) == len(fc.VALIDATION_SECONDS_PER_CASE) == 21
    assert len(fc.DOWNLOAD_SECONDS) == len(fc.UPLOAD_SECONDS) == 16
    tables = (fc.TRAINING_SECONDS_PER_CASE, fc.VALIDATION_SECONDS_PER_CASE, fc.DOWNLOAD_SECONDS, fc.UPLOAD_SECONDS)
    assert all(len(row) == 2 and row[0] > 1 and row[1] >= 0 for table in tables for row in table)
    # spot checks against experiment.py: first and last rows, the one zero sd
    assert fc.TRAINING_SECONDS_PER_CASE[0] == (6.710741331207654, 0.8726112813698301)
    assert fc.VALIDATION_SECONDS_PER_CASE[-1] == (11.222161868549701, 0.7021223062972527)
    assert fc.DOWNLOAD_SECONDS[14] == (139.847, 80.04755583050091)
    assert fc.UPLOAD_SECONDS[2] == (20.0, 0.0)
    assert fc.WEEK_SECONDS == WEEK and fc.SOURCE_SEED == 0xFEEDFACE


# -- the timings --------------------------------------------------------------------------------------------------
def test_timings_are_drawn_once_from_the_seed(federation):
    names, _, timings = federation
    assert list(timings) == names
    assert fc.collaborator_timings(names) == timings
    assert all(0 <= t.compute_row < 21 and 0 <= t.network_row < 16 for t in timings.values())
    assert fc.collaborator_timings(names, 1) != timings
    # the source's rows for its first six collaborators (gen_collaborator_time_stats run on these names)
    first = [(n, timings[n].compute_row, timings[n].network_row) for n in names[:6]]
    assert first == [("1", 14, 7), ("10", 17, 10), ("11", 20, 3), ("12", 13, 8), ("13", 12, 1), ("14", 20, 13)]
    row = timings["1"]
    assert (row.train, row.validate) == (fc.TRAINING_SECONDS_PER_CASE[14], fc.VALIDATION_SECONDS_PER_CASE[14])
    assert (row.download, row.upload) == (fc.DOWNLOAD_SECONDS[7], fc.UPLOAD_SECONDS[7])


def test_timings_refuse_duplicate_names_and_bad_seeds():
    with pytest.raises(ValueError, match="unique"):
        fc.collaborator_timings(["a", "a"])
    with pytest.raises(ValueError, match="seed"):
        fc.collaborator_timings(["a"], -1)


# -- the clock ----------------------------------------------------------------------------------------------------
def test_round_seconds_match_the_source_clock(federation):
    """Values from the source's compute_times_per_collaborator run on the same inputs (partitioning_2, round 3)."""
    names, cases, timings = federation
    longest, seconds = fc.round_seconds(timings, ["1", "2", "24"], cases, 3)
    source = {"1": 2058.120466877586, "10": 198.62076174809556, "2": 2064.508672876699, "24": 2521.80148749148}
    assert {n: seconds[n] for n in source} == pytest.approx(source, rel=1e-12)
    assert seconds["33"] == pytest.approx(258.0647831497946, rel=1e-12)
    assert longest == pytest.approx(2521.80148749148, rel=1e-12)
    assert list(seconds) == names


def test_chosen_collaborators_train_validate_twice_and_upload_the_others_only_download_and_validate():
    """Hand-computed: one stream seeded by the round, drawn collaborator by collaborator in the documented order."""
    timings = {"a": fc.Timing(0, 0), "b": fc.Timing(1, 1)}
    cases = {"a": (4, 2), "b": (3, 1)}
    rng = np.random.RandomState(7)

    def draw(stat):
        return max(1.0, rng.normal(stat[0], stat[1]))

    a = draw(fc.DOWNLOAD_SECONDS[0]) + 2 * draw(fc.VALIDATION_SECONDS_PER_CASE[0])
    a += 4 * draw(fc.TRAINING_SECONDS_PER_CASE[0]) + 2 * draw(fc.VALIDATION_SECONDS_PER_CASE[0])
    a += draw(fc.UPLOAD_SECONDS[0])
    b = draw(fc.DOWNLOAD_SECONDS[1]) + 1 * draw(fc.VALIDATION_SECONDS_PER_CASE[1])
    longest, seconds = fc.round_seconds(timings, ["a"], cases, 7)
    assert seconds == pytest.approx({"a": a, "b": b}, rel=1e-15)
    assert longest == max(seconds.values()) == seconds["a"]


def test_the_round_lasts_as_long_as_the_slowest_and_depends_on_who_trains(federation):
    names, cases, timings = federation
    for round_number in range(5):
        longest, seconds = fc.round_seconds(timings, names, cases, round_number)
        assert longest == max(seconds.values())
    _, nobody = fc.round_seconds(timings, [], cases, 0)
    _, everyone = fc.round_seconds(timings, names, cases, 0)
    assert all(everyone[n] > nobody[n] for n in names)
    # one stream for the round: who trains shifts the later collaborators' draws (as in the source) ...
    _, first_trains = fc.round_seconds(timings, [names[0]], cases, 0)
    assert first_trains[names[1]] != nobody[names[1]]
    # ... but not the order the chosen ones are listed in
    assert fc.round_seconds(timings, names[::-1], cases, 0) == fc.round_seconds(timings, names, cases, 0)


def test_the_clock_is_a_pure_function_of_its_arguments(federation):
    names, cases, timings = federation
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    first = [fc.round_seconds(timings, names[:6], cases, r) for r in range(4)]
    fc.collaborator_timings(names)
    assert np.array_equal(np.random.get_state()[1], state)  # the global numpy generator is left alone
    assert [fc.round_seconds(timings, names[:6], cases, r) for r in reversed(range(4))][::-1] == first
    assert fc.round_seconds(timings, names[:6], cases, 0) != fc.round_seconds(timings, names[:6], cases, 1)


def test_training_time_is_linear_in_epochs(federation):
    names, cases, timings = federation
    at = {e: fc.round_seconds(timings, names[:3], cases, 2, epochs=e)[1] for e in (0, 1, 2)}
    for n in names[:3]:
        assert at[2][n] - at[1][n] == pytest.approx(at[1][n] - at[0][n]) and at[1][n] > at[0][n]
    assert all(at[0][n] == at[2][n] for n in names[3:])


def test_draws_are_clipped_below_at_one_second():
    rng = np.random.RandomState(0)
    assert fc.clipped_normal(rng, (-5.0, 0.0)) == 1.0
    assert fc.clipped_normal(rng, (0.5, 0.0)) == 1.0
    assert fc.clipped_normal(rng, (3.0, 0.0)) == 3.0
    # download row 14 (139.8 s, sd 80.0 s) sometimes draws below 1 s: that round's download then takes 1 s
    mean, sd = fc.DOWNLOAD_SECONDS[14]
    low = [r for r in range(300) if np.random.RandomState(r).normal(mean, sd) < 1]
    assert low
    for r in low:
        assert fc.round_seconds({"x": fc.Timing(0, 14)}, [], {"x": (5, 0)}, r) == (1.0, {"x": 1.0})


def test_round_seconds_refuse_unknown_collaborators():
    timings = {"a": fc.Timing(0, 0)}
    with pytest.raises(ValueError, match="no timing"):
        fc.round_seconds(timings, ["b"], {"a": (1, 1)}, 0)
    with pytest.raises(ValueError, match="no case counts"):
        fc.round_seconds(timings, [], {}, 0)


# -- the score ----------------------------------------------------------------------------------------------------
def test_the_convergence_score_on_three_rounds_by_hand():
    score = fc.ConvergenceScore()
    # round 1: best 0.2, auc 0.2 x 100000; projected ((W - 1e5) x 0.2 + 2e4) / W = 0.2
    assert score.add_round(0.2, 100_000) == pytest.approx(0.2)
    # round 2: best 0.5, auc 2e4 + 1e5; projected (304800 x 0.5 + 120000) / W
    assert score.add_round(0.5, 200_000) == pytest.approx(272_400 / WEEK)
    # round 3: a worse Dice keeps best 0.5, auc 120000 + 25000; projected (254800 x 0.5 + 145000) / W
    assert score.add_round(0.4, 50_000) == pytest.approx(272_400 / WEEK)
    assert (score.best, score.auc, score.total_seconds, score.rounds) == (0.5, pytest.approx(145_000), 350_000, 3)
    assert not score.spent


@pytest.mark.parametrize("dice", [0.0, 0.37, 0.9])
def test_a_constant_dice_over_the_week_scores_that_dice(dice):
    score = fc.ConvergenceScore()
    while not score.spent:
        assert score.add_round(dice, 70_001.5) == pytest.approx(dice)
    assert score.total_seconds > WEEK


def test_the_round_that_crosses_the_week_counts_and_is_the_last():
    score = fc.ConvergenceScore()
    score.add_round(0.3, 300_000)
    score.add_round(0.6, 300_000)
    assert not score.spent  # 600000 s < a week
    projected = score.add_round(0.9, 300_000)
    assert score.spent
    # exactly the area under best-so-far up to the week's end, over the week
    assert projected == pytest.approx((0.3 * 300_000 + 0.6 * 300_000 + 0.9 * (WEEK - 600_000)) / WEEK)
    with pytest.raises(ValueError, match="week is spent"):
        score.add_round(0.95, 10)


def test_a_round_ending_exactly_at_the_week_is_not_the_end():
    score = fc.ConvergenceScore()
    score.add_round(0.5, WEEK)
    assert not score.spent  # the source stops only when the total exceeds the week
    score.add_round(0.5, 1)
    assert score.spent


def test_a_nan_dice_never_becomes_the_best():
    score = fc.ConvergenceScore()
    score.add_round(0.4, 10)
    score.add_round(float("nan"), 10)
    assert score.best == 0.4


# -- collaborator selection ---------------------------------------------------------------------------------------
NAMES = [f"site-{i}" for i in range(1, 11)]
SIZES = {n: s for n, s in zip(NAMES, [5, 40, 12, 12, 3, 30, 7, 40, 1, 9])}


def test_all_is_everyone_in_the_given_order():
    assert fc.POLICIES["all"](NAMES[::-1], SIZES, 3, 0, None) == NAMES[::-1]
    assert fc.parse_policy("all") is fc.select_all


@pytest.mark.parametrize("k", [4, 6])
def test_random_k_is_a_draw_from_seed_and_round_alone(k):
    policy = fc.parse_policy(f"random:{k}")
    draws = [policy(NAMES, SIZES, r, 1, None) for r in range(30)]
    assert all(len(d) == k and len(set(d)) == k and set(d) <= set(NAMES) for d in draws)
    assert all(d == [n for n in NAMES if n in d] for d in draws)  # in the given order
    assert draws == [policy(NAMES, SIZES, r, 1, {"site-1": 9.0}) for r in range(30)]  # ignores sizes and times
    assert [set(policy(NAMES[::-1], {}, r, 1, None)) for r in range(30)] == [set(d) for d in draws]
    assert len({tuple(d) for d in draws}) > 1 and draws != [policy(NAMES, SIZES, r, 2, None) for r in range(30)]


def test_random_k_draws_the_sites_partial_participation_draws():
    from fedseg.rounds import participants

    for r in range(20):
        # participants sorts the names; a policy keeps the given order
        assert sorted(fc.random_k(NAMES, SIZES, r, 5, None, k=6)) == participants(NAMES, 6, seed=5, round_number=r)


def test_largest_k_is_the_most_training_cases(federation):
    assert fc.parse_policy("largest:3")(NAMES, SIZES, 0, 0, None) == ["site-2", "site-6", "site-8"]
    # equal sizes: the earlier name first
    assert fc.largest_k(NAMES, SIZES, 0, 0, None, k=4) == ["site-2", "site-3", "site-6", "site-8"]
    names, cases, _ = federation
    train = {n: cases[n][0] for n in names}
    assert sorted(fc.largest_k(names, train, 7, 3, None, k=6)) == ["1", "2", "24", "25", "26", "3"]
    with pytest.raises(ValueError, match="no size"):
        fc.largest_k(NAMES, {}, 0, 0, None, k=2)


def test_drop_slow_drops_the_slowest_of_the_last_round():
    policy = fc.parse_policy("drop_slow:2")
    assert policy(NAMES, SIZES, 0, 0, None) == NAMES  # round 0: no times yet
    times = {n: float(i) for i, n in enumerate(NAMES)}
    assert policy(NAMES, SIZES, 1, 0, times) == NAMES[:-2]
    times["site-1"] = times["site-10"]  # a tie with the slowest: the earlier name goes first
    assert policy(NAMES, SIZES, 1, 0, times) == NAMES[1:-1]
    assert policy(NAMES, SIZES, 1, 0, {"site-3": 5.0}) == [n for n in NAMES if n != "site-3"]  # untimed ones stay


@pytest.mark.parametrize("text", ["random:50", "largest:50", "drop_slow:50"])
def test_k_larger_than_the_collaborators(text):
    times = {n: float(i) for i, n in enumerate(NAMES)}
    chosen = fc.parse_policy(text)(NAMES, SIZES, 4, 0, times)
    assert chosen == (NAMES[:1] if text.startswith("drop_slow") else NAMES)  # drop_slow keeps one


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "unknown collaborator policy ''"),
        ("fastest:3", "unknown collaborator policy 'fastest:3'"),
        ("all:3", "'all' takes no number"),
        ("random", "'random' needs a number"),
        ("largest:", "the number must be a whole number >= 1"),
        ("random:0", "the number must be a whole number >= 1"),
        ("drop_slow:-1", "the number must be a whole number >= 1"),
        ("random:2.5", "the number must be a whole number >= 1"),
    ],
)
def test_the_parser_refuses_in_one_line(text, message):
    with pytest.raises(ValueError, match=message) as caught:
        fc.parse_policy(text)
    assert "\n" not in str(caught.value)


# -- sizes --------------------------------------------------------------------------------------------------------
def test_partitioning_2_has_33_collaborators_in_the_sources_order():
    sizes = fc.partition_sizes(PARTITIONING_2)
    assert len(sizes) == 33 and sum(sizes.values()) == 1251 and sizes[1] == 170 and sizes[3] == 171
    assert fc.source_order(list(sizes))[:4] == [1, 10, 11, 12] and fc.source_order([2, 10, 1]) == [1, 10, 2]
    assert fc.source_split(170) == (136, 34) and fc.source_split(4) == (3, 1)


def assert_scaled(sizes, total):
    scaled = fc.scaled_sizes(sizes, total)
    keys = list(sizes)
    assert list(scaled) == keys and sum(scaled.values()) == total and min(scaled.values()) >= 1
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if sizes[a] > sizes[b]:
                assert scaled[a] >= scaled[b], (a, b)
            elif sizes[a] == sizes[b]:
                assert 0 <= scaled[a] - scaled[b] <= 1, (a, b)
            else:
                assert scaled[a] <= scaled[b], (a, b)
    return scaled


@pytest.mark.parametrize("total", [33, 34, 50, 66, 100, 200, 1251])
def test_scaled_partitioning_2_sums_exactly_keeps_order_and_gives_everyone_a_case(total):
    sizes = fc.partition_sizes(PARTITIONING_2)
    scaled = assert_scaled(sizes, total)
    if total == 1251:
        assert scaled == sizes
    if total == 33:
        assert set(scaled.values()) == {1}


def test_scaled_sizes_by_hand():
    # share of 5 over 16: b's 0.31 is under 1, so b gets 1; a and c share 4: 2.67 and 1.33, the unit left to a
    assert fc.scaled_sizes({"a": 10, "b": 1, "c": 5}, 5) == {"a": 3, "b": 1, "c": 1}
    assert fc.scaled_sizes({"x": 2, "y": 2, "z": 2}, 4) == {"x": 2, "y": 1, "z": 1}
    assert_scaled({n: s for n, s in zip("abcdefgh", [1, 1, 2, 3, 5, 8, 13, 400])}, 17)


def test_scaled_sizes_refuse_what_cannot_be_done():
    with pytest.raises(ValueError, match="at least 1 case"):
        fc.scaled_sizes({"a": 3, "b": 4}, 1)
    with pytest.raises(ValueError, match="whole numbers >= 1"):
        fc.scaled_sizes({"a": 0, "b": 4}, 3)
