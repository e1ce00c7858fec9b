"""bench.fets_challenge's plan and summary, and bench.watched_run's lost-site watch, without running a federation."""

from __future__ import annotations

import json

import pytest

from bench import fets_challenge as bench
from bench.watched_run import lost_sites, recorded_rounds


def test_the_sites_keep_partitioning_2s_order_and_relative_sizes():
    rows = bench.site_rows()
    assert len(rows) == 33 == len(bench.sites()) and bench.sites()[0] == "site-1"
    subjects = [row[0] for row in rows]
    assert subjects[0] == subjects[1] == subjects[2] == max(subjects) and min(subjects) == 2  # 170-subject ones
    assert rows == bench.site_rows()  # the same every time: a resumed plan prepares the same sites


def test_the_sweeps_best_point_joins_the_plan_only_when_no_arm_runs_it():
    assert bench.same_arm(bench.sweep_arms()["fedref_p3_l0.3"]) == "fedref_trend"
    assert bench.same_arm(bench.sweep_arms()["fedref_p2_l0.3"]) is None
    runs = {
        arm: {"arm": arm, "convergence_score": 0.9 if arm == "fedref_p2_l1.0" else 0.5} for arm in bench.sweep_arms()
    }
    assert bench.best_sweep_point(runs)[0] == "fedref_p2_l1.0"
    del runs["fedref_p5_l1.0"]
    assert bench.best_sweep_point(runs) is None  # not before every point ran


def _run(arm: str, seed: int, score: float, dice: float, rounds_to) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "policy": "random:6",
        "convergence_score": score,
        "final_dice_mean": dice,
        "rounds_to_target": rounds_to,
        "simulated_hours": 19.0,
    }


def test_the_summary_pairs_each_arm_with_fedavg_and_fedpidavg_seed_by_seed():
    runs = [_run("fedavg", s, 0.8, 0.85, 6) for s in (0, 1)] + [_run("fedpidavg", s, 0.7, 0.8, None) for s in (0, 1)]
    runs += [_run("fedref_trend", 0, 0.82, 0.86, 5), _run("fedref_trend", 1, 0.84, 0.88, 7)]
    (row,) = [r for r in bench.summarise_runs(runs) if r["arm"] == "fedref_trend"]
    assert row["convergence_score"] == pytest.approx(0.83) and row["seeds"] == [0, 1]
    assert row["convergence_score_minus_fedavg"]["mean"] == pytest.approx(0.03)
    assert row["convergence_score_minus_fedpidavg"]["n"] == 2 and row["rounds_to_target_minus_fedpidavg"] is None
    assert row["rounds_to_target_minus_fedavg"]["mean"] == pytest.approx(0.0)


def test_the_watch_finds_a_site_the_simulator_lost_or_a_round_missed(tmp_path):
    server = tmp_path / "server" / "simulate_job"
    server.mkdir(parents=True)
    assert lost_sites(str(tmp_path)) == [] and recorded_rounds(str(tmp_path)) == 0
    (tmp_path / "server" / "log.txt").write_text(
        "2026-12-02 13:02:09,155 - SimulatorClientRunner - ERROR - Communication error with client site-4: "
        "[Errno 104] Connection reset by peer\n"
    )
    (server / "round_metrics.jsonl").write_text(json.dumps({"round": 0, "missing": ["site-9"]}) + "\n")
    assert lost_sites(str(tmp_path)) == ["site-4", "site-9"] and recorded_rounds(str(tmp_path)) == 1
