"""Partial participation in FLARE's simulator: 3 sites, 2 per round, FedAvg and FedRef's diagonal prior.

What a user reads in round_metrics.jsonl: who trained, who only validated, the same sites for both
algorithms of a seed, and FedRef's step ratio once its buffer is full. FedAvg runs the FeTS Challenge mode:
the policy random:2 (the same draw as FedRef's clients_per_round 2), the challenge clock on partitioning_2's
case counts and a time budget that ends the run after two of its three rounds."""

from __future__ import annotations

import json
import os

import pytest

from fedseg.app.artifacts import load_run
from fedseg.app.compare import write_comparison
from fedseg.app.report import write_report
from fedseg.challenge_rounds import RoundPlan
from fedseg.controller import participants
from fedseg.data_prep.fets2022 import prepare_sites
from fedseg.jobs.recipes import JobSettings, run_simulation

SITES = ["site-1", "site-2", "site-3"]
PARTITIONING_2 = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "fets2022", "partitioning_2.csv")
TINY = dict(
    sites=SITES,
    num_rounds=2,
    seed=5,
    local_steps=2,
    batch_size=1,
    crop=(32, 32, 24),
    channels=(8, 16, 32),
    threads=1,
    cross_site_eval=False,
    val_max_cases=0,  # every case (a few here): a site refuses 1 to min_val_cases - 1
)


CHALLENGE = {"selection_policy": "random:2", "challenge_clock": PARTITIONING_2}


def clock(rounds: int) -> RoundPlan:
    """The server's plan for the FedAvg run, priced for ``rounds`` rounds."""
    cases = JobSettings(sites=SITES, **CHALLENGE).clock_cases
    plan = RoundPlan("random:2", 0, seed=5, clock_cases=cases)
    plan.replay(SITES, rounds)
    return plan


def budget() -> int:
    """A budget the clock passes in round 1: the run ends after 2 of its 3 rounds."""
    return int(clock(1).total_seconds) + 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_fets):
    root = tmp_path_factory.mktemp("partial")
    prepare_sites(tiny_fets, str(root / "sites"), validation_fraction=0.34)
    out = {}
    for algorithm, extra in (
        ("fedavg", dict(CHALLENGE, num_rounds=3, time_budget_seconds=budget())),
        ("fedref", {"fedref_variant": "diagonal", "buffer_size": 2, "lambda1": 0.0, "clients_per_round": 2}),
    ):
        job = JobSettings(algorithm=algorithm, data_root=str(root / "sites"), **{**TINY, **extra})
        out[algorithm] = load_run(run_simulation(job, str(root / "workspace")))
    return root, out


def test_round_records_name_who_trained_and_every_algorithm_gets_the_same_sites(runs):
    _, by_algorithm = runs
    expected = [participants(SITES, 2, seed=5, round_number=r) for r in range(2)]
    assert len({tuple(e) for e in expected}) > 1  # the draw changes from round to round
    for algorithm, run in by_algorithm.items():
        assert [r["participants"] for r in run.rounds] == expected, algorithm
        for record in run.rounds:
            assert sorted(record["sites"]) == record["participants"] and record["missing"] == []
            assert record["global_updated"] and record["nr_aggregated"] == 2
            # the site left out validated the same global model without training
            absent = sorted(set(SITES) - set(record["participants"]))
            assert sorted(record["validation_only"]) == absent
            assert all("train_loss" not in m and 0 <= m["dice_mean"] <= 1 for m in record["validation_only"].values())


def test_fedref_logs_its_variant_and_step_ratio(runs):
    _, by_algorithm = runs
    fedref = [r["fedref"] for r in by_algorithm["fedref"].rounds]
    assert [f["applied"] for f in fedref] == [False, True]  # p = 2: round 0 is warm-up
    assert all(f["variant"] == "diagonal" for f in fedref)
    assert fedref[0]["step_ratio"] == pytest.approx(1.0)  # warm-up is FedAvg
    # after warm-up the pull toward the trend changes the step: shorter or, extrapolating, longer than FedAvg's
    for f in fedref[1:]:
        assert 0 < f["alpha_mean"] <= 0.5 and f["step_ratio"] > 0 and f["step_ratio"] != pytest.approx(1.0, abs=1e-4)


def test_the_challenge_clock_prices_each_round_and_its_budget_ends_the_run(runs):
    root, by_algorithm = runs
    run = by_algorithm["fedavg"]
    plan = RoundPlan("random:2", 0, seed=5, clock_cases=JobSettings(sites=SITES, **CHALLENGE).clock_cases)
    priced = [plan.price(SITES, plan.choose(SITES, r), r) for r in range(2)]
    assert len(run.rounds) == 2 and run.run_info["completed"] and run.run_info["planned_rounds"] == 3
    for record, expected in zip(run.rounds, priced):
        assert record["simulated_seconds"] == pytest.approx(expected["simulated_seconds"])
        assert record["simulated_total_seconds"] == pytest.approx(expected["simulated_total_seconds"])
    assert run.rounds[-1]["simulated_total_seconds"] > run.run_info["settings"]["time_budget_seconds"]
    page = open(write_report(run, str(root / "report")), encoding="utf-8").read()
    assert "FeTS Challenge clock (random:2)" in page and "convergence score" in page
    summary = json.load(open(root / "report" / "summary.json"))
    assert 0 < summary["challenge"]["convergence_score"] <= 1 and summary["challenge"]["rounds"] == 2


def test_compare_names_the_participation_and_the_score(runs):
    root, by_algorithm = runs
    write_comparison([r.folder for r in by_algorithm.values()], str(root / "compare"), target=0.3)
    page = (root / "compare" / "compare.html").read_text(encoding="utf-8")
    assert "2 of 3 sites per round" in page and "fedref-diagonal" in page
    assert "FeTS Challenge convergence score" in page and "Simulated time (FeTS Challenge clock)" in page
