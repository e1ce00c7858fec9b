"""The FeTS Challenge run mode: who trains, what a round costs on the clock, when the week is spent, and the
score a report reads back (fedseg.challenge_rounds, fedseg.app.challenge_score)."""

from __future__ import annotations

import json
import os

import pytest

from fedseg import fets_challenge
from fedseg.app.artifacts import load_run
from fedseg.app.challenge_score import convergence, convergence_text
from fedseg.challenge_rounds import RoundPlan, check_plan
from fedseg.jobs.settings import JobSettings
from fedseg.rounds import participants
from fedseg.server_config import JobRefused

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTITIONING_2 = os.path.join(REPO_ROOT, "tests", "data", "fets2022", "partitioning_2.csv")
SITES = [f"site-{p}" for p in range(1, 34)]


@pytest.fixture(scope="module")
def cases():
    return fets_challenge.clock_cases(PARTITIONING_2, SITES)


def test_clock_cases_are_the_challenges_80_20_split_of_each_partition(cases):
    sizes = fets_challenge.partition_sizes(PARTITIONING_2)
    assert len(cases) == 33 and cases["site-1"] == [136, 34]  # partition 1: 170 subjects, int(0.8 x 170) to train
    assert all(sum(cases[f"site-{p}"]) == n for p, n in sizes.items())
    with pytest.raises(ValueError, match=r"site\(s\) hospital-a are not site-<partition> of its 33 partitions"):
        fets_challenge.clock_cases(PARTITIONING_2, ["site-1", "hospital-a"])


@pytest.mark.parametrize("k", [0, 2, 6])
def test_without_a_policy_the_plan_draws_the_sites_clients_per_round_does(k):
    plan = RoundPlan("", k, seed=3)
    assert [plan.choose(SITES, r) for r in range(8)] == [participants(SITES, k, 3, r) for r in range(8)]


def test_random_k_picks_the_same_sites_as_k_clients_per_round():
    policy, sampled = RoundPlan("random:6", 0, seed=4), RoundPlan("", 6, seed=4)
    assert [policy.choose(SITES, r) for r in range(10)] == [sampled.choose(SITES, r) for r in range(10)]


def test_a_round_costs_its_slowest_site_on_the_source_clock_and_the_total_adds_up(cases):
    plan = RoundPlan("largest:6", 0, seed=0, clock_cases=cases)
    timings = fets_challenge.collaborator_timings(sorted(SITES))
    total = 0.0
    for r in range(3):
        chosen = plan.choose(SITES, r)
        assert chosen == sorted(["site-1", "site-2", "site-3", "site-24", "site-25", "site-26"])  # the largest six
        fields = plan.price(SITES, chosen, r)
        seconds, per_site = fets_challenge.round_seconds(timings, chosen, cases, r)
        total += seconds
        assert fields["simulated_seconds"] == seconds and fields["simulated_total_seconds"] == pytest.approx(total)
        assert per_site[fields["slowest_site"]] == seconds


def test_a_continued_run_replays_the_clock_to_where_it_stopped(cases):
    """drop_slow reads the last round's times: a replayed plan chooses and prices round 5 as the live one did."""
    live = RoundPlan("drop_slow:2", 0, seed=0, clock_cases=cases)
    history = []
    for r in range(6):
        chosen = live.choose(SITES, r)
        history.append((chosen, live.price(SITES, chosen, r)))
    assert len({tuple(c) for c, _ in history}) > 1 and all(len(c) == 31 for c, _ in history[1:])
    replayed = RoundPlan("drop_slow:2", 0, seed=0, clock_cases=cases)
    replayed.replay(SITES, 5)
    chosen = replayed.choose(SITES, 5)
    assert (chosen, replayed.price(SITES, chosen, 5)) == history[5]


def test_the_run_is_spent_once_the_clock_passes_the_budget(cases):
    plan = RoundPlan("all", 0, clock_cases=cases, budget_seconds=10000)
    rounds = 0
    while not plan.spent:
        plan.price(SITES, plan.choose(SITES, rounds), rounds)
        rounds += 1
    assert rounds >= 2 and plan.total_seconds > 10000
    assert not RoundPlan("all").spent  # no clock, no budget
    with pytest.raises(JobRefused, match="no case counts for site.s. site-99"):
        plan.price([*SITES, "site-99"], SITES, rounds)


@pytest.mark.parametrize(
    "policy, k, clock, budget, message",
    [
        ("fastest:3", 0, None, 1, "unknown collaborator policy 'fastest:3'"),
        ("random:2", 2, None, 1, "give one of them"),
        ("largest:3", 0, None, 1, "reads the clock's case counts or times"),
        ("all", 0, {"../etc": [1, 1]}, 1, "must be a plain name"),
        ("all", 0, {"site-1": [5]}, 1, r"expected \[training cases, validation cases\]"),
        ("all", 0, {"site-1": [-1, 2]}, 1, "training cases = -1"),
        ("all", 0, ["site-1"], 1, "expected a mapping"),
        ("all", 0, None, 0, "time_budget_seconds = 0"),
    ],
)
def test_the_server_refuses_a_plan_outside_its_meaning(policy, k, clock, budget, message):
    with pytest.raises(JobRefused, match=message):
        check_plan(policy, k, clock, budget)


def test_job_settings_read_the_clock_from_the_csv_and_check_the_plan():
    job = JobSettings(sites=SITES[:3], challenge_clock=PARTITIONING_2, selection_policy="drop_slow:1")
    assert job.clock_cases == {"site-1": [136, 34], "site-2": [136, 34], "site-3": [136, 35]}
    with pytest.raises(ValueError, match="reads the clock's case counts or times"):
        JobSettings(sites=SITES[:3], selection_policy="largest:1")


def _clock_run(tmp_path, dice: list[float], seconds: list[float], budget: int | None = None):
    server = tmp_path / "clock" / "server" / "simulate_job"
    os.makedirs(server)
    records = [
        {"round": r, "sites": {"site-1": {"dice_mean": d, "n_cases": 1}}, "simulated_seconds": s, "participants": []}
        for r, (d, s) in enumerate(zip(dice, seconds))
    ]
    (server / "round_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = {"selection_policy": "random:6"} | ({"time_budget_seconds": budget} if budget else {})
    (tmp_path / "clock" / "run.json").write_text(json.dumps({"settings": settings}))
    return load_run(str(tmp_path / "clock"))


def test_the_score_is_the_area_under_best_dice_so_far_projected_to_the_week(tmp_path):
    week = fets_challenge.WEEK_SECONDS
    result = convergence(_clock_run(tmp_path, [0.2, 0.5, 0.4], [3600.0, 7200.0, 3600.0]))
    auc = 0.2 * 3600 + 0.5 * 7200 + 0.5 * 3600  # the third round's 0.4 counts at the best so far, 0.5
    assert result["convergence_score"] == pytest.approx(((week - 14400) * 0.5 + auc) / week)
    assert result["simulated_hours"] == pytest.approx(4.0) and result["rounds"] == 3
    assert [r["dice_mean"] for r in result["per_round"]] == pytest.approx([0.2, 0.5, 0.4])
    assert "random:6" in convergence_text(result) and "convergence score" in convergence_text(result)


def test_rounds_past_the_budget_do_not_count_and_a_run_without_the_clock_has_no_score(tmp_path, run_folder):
    result = convergence(_clock_run(tmp_path, [0.1, 0.3, 0.9], [60.0, 60.0, 60.0], budget=100))
    assert result["rounds"] == 2 and result["budget_spent"] and result["best_dice_mean"] == pytest.approx(0.3)
    assert convergence(load_run(str(run_folder))) is None and convergence_text(None) == ""
