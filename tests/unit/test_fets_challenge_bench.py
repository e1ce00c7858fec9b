"""bench.fets_challenge's plan and summary, and bench.watched_run's lost-site watch, without running a federation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

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


def _clocked(arm: str, seed: int, policy: str, dice: list, hours: list) -> dict:
    rows = [{"round": i, "dice_mean": d, "simulated_seconds": h * 3600} for i, (d, h) in enumerate(zip(dice, hours))]
    return {"arm": arm, "seed": seed, "policy": policy, "per_round": rows, "final_dice_mean": dice[-1]}


def test_the_figure_draws_the_mean_best_so_far_over_the_seeds_every_arm_ran(tmp_path):
    from bench import fets_challenge_figure as figure

    assert figure.best_so_far([{"dice_mean": 0.3}, {"dice_mean": None}, {"dice_mean": 0.2}, {"dice_mean": 0.5}]) == [
        0.3,
        0.3,
        0.3,
        0.5,
    ]
    runs = [
        _clocked("fedavg", 0, "all", [0.2, 0.6], [1, 2]),
        _clocked("fedavg", 1, "all", [0.4, 0.2], [3, 2]),
        _clocked("fedref_trend", 0, "all", [0.4, 0.8], [1, 2]),
        _clocked("fedavg", 2, "all", [0.9, 0.9], [1, 1]),  # a seed the other arm has not run: left out
        _clocked("centralised", 0, "all", [0.9, 0.95], [1, 1]),
        _clocked("centralised", 2, "all", [0.0, 0.05], [1, 1]),
    ]
    assert figure.paired_seeds(runs, "all") == [0] and figure.paired_seeds(runs, "random:6") == []
    runs.append(_clocked("fedref_trend", 1, "all", [0.0, 0.1], [3, 2]))
    curves = figure.mean_curves(runs, "all")
    assert set(curves) == {"fedavg", "fedref_trend"}
    hours, best = curves["fedavg"]
    assert hours == pytest.approx([0.0, 2.0, 4.0]) and best == pytest.approx([0.0, 0.3, 0.5])
    assert curves["fedref_trend"][1] == pytest.approx([0.0, 0.2, 0.45])
    assert figure.centralised_final(runs) == pytest.approx(0.95)  # seed 2 is not drawn
    png = figure.figure_png(runs)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_the_figure_command_draws_the_committed_results(tmp_path):
    """The docs' command, on the result file in the repository (as docs/benchmarks.md shows it)."""
    import subprocess
    import sys

    from helpers.commands import REPO_ROOT

    out = tmp_path / "curves.png"
    result = subprocess.run(
        [sys.executable, "-m", "bench.fets_challenge_figure", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes().startswith(b"\x89PNG") and "written" in result.stdout


def test_the_fedavgm_arm_is_fedref_momentum_without_the_prior():
    """NVFlare's FedOpt step, built from the fedavgm arm's job settings as the exported job builds it, moves the
    global model exactly as FedRef's momentum with its prior switched off: the two arms differ by the prior alone."""
    from nvflare.app_opt.pt.fedopt_ctl import FedOpt

    from fedseg.fedref import FedRefUpdater
    from fedseg.jobs.recipes import _server_optimizer
    from fedseg.jobs.settings import JobSettings

    momentum_arm = bench.ARMS["fedref_momentum"]
    spec = _server_optimizer(JobSettings(**bench.ARMS["fedavgm"]))
    assert spec["optimizer_args"]["path"] == "torch.optim.SGD"
    rng = np.random.default_rng(5)
    start = torch.tensor(rng.normal(size=6), dtype=torch.float32)
    network = torch.nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        network.weight.copy_(start)
    optimizer = torch.optim.SGD(network.parameters(), **spec["optimizer_args"]["args"])
    schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, **spec["lr_scheduler_args"]["args"])
    fedopt = SimpleNamespace(torch_model=network, optimizer=optimizer, lr_scheduler=schedule, device="cpu")
    updater = FedRefUpdater(3, 0.0, 0.0, momentum=momentum_arm["fedref_momentum"])
    ours = {"weight": start.reshape(1, 6).clone()}
    updater.start(ours)
    for _ in range(6):
        step = torch.tensor(rng.normal(size=(1, 6)), dtype=torch.float32)
        ours, _ = updater.update({"weight": ours["weight"] + step}, ours)
        theirs, _ = FedOpt.optimizer_update(fedopt, {"weight": step.numpy()})
        torch.testing.assert_close(ours["weight"], theirs["weight"], rtol=0, atol=1e-6)
