"""The benchmark tables are computed from run records: check the arithmetic on records with known answers."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from bench.common import recorded_command
from bench.communication import summarise_modes
from bench.convergence import first_complete_run, incomplete_rounds, rounds_to, sensitivity, summarise_algorithms
from conftest import FETS_CSV_DIR


def run(mode: str, seed: int, dice: float, up: int, down: int) -> dict:
    return {
        "mode": mode,
        "seed": seed,
        "final_dice_mean": dice,
        "bytes_up_per_site": up,
        "bytes_down_per_site": down,
        "wall_seconds": 1.0,
    }


def test_compressed_transfer_is_compared_with_full_precision_of_the_same_seed():
    runs = [
        run("full", 0, 0.60, 100, 100),
        run("full", 1, 0.50, 100, 100),
        run("float16", 0, 0.59, 50, 50),
        run("float16", 1, 0.52, 50, 50),
        run("adaquant", 0, 0.40, 10, 20),
        run("adaquant", 1, 0.45, 10, 20),
    ]
    rows = {r["mode"]: r for r in summarise_modes(runs)}
    assert rows["full"]["meets_targets"] is None and rows["full"]["bytes_ratio"] == 1.0
    half = rows["float16"]
    assert half["bytes_ratio"] == 0.5
    assert half["dice_difference"] == pytest.approx(0.005)  # (-0.01 + 0.02) / 2: paired, not 0.555 - 0.55
    assert half["dice_difference_max_abs"] == pytest.approx(0.02)
    assert half["meets_targets"] is True
    assert rows["adaquant"]["bytes_ratio"] == pytest.approx(0.15)
    assert rows["adaquant"]["meets_targets"] is False  # a quarter of the bytes, but 0.125 Dice lost


def test_a_run_that_lost_a_site_is_not_taken_as_a_measurement():
    whole = SimpleNamespace(rounds=[{"missing": [], "rejected": {}}, {"missing": [], "rejected": {}}])
    assert incomplete_rounds(whole) == []
    broken = SimpleNamespace(
        rounds=[{"missing": ["site-5"], "rejected": {}}, {"missing": [], "rejected": {"site-2": "NaN in conv.bias"}}]
    )
    assert incomplete_rounds(broken) == ["round 0: site-5 (no result)", "round 1: site-2 (rejected: NaN in conv.bias)"]
    tries = iter([broken, whole])
    assert first_complete_run(lambda: next(tries), "job", attempts=3) is whole  # run again after a lost site
    with pytest.raises(RuntimeError, match="job: a site was missing or rejected in each of 2 attempts"):
        first_complete_run(lambda: broken, "job", attempts=2)


def test_the_recorded_command_leaves_out_the_scratch_folder():
    assert (
        recorded_command(["bench/convergence.py", "--resume", "--work", "/tmp/x", "--seeds", "0"])
        == ".venv/bin/python -m bench.convergence --resume --seeds 0"
    )
    assert recorded_command(["bench/communication.py", "--work=/tmp/x"]) == ".venv/bin/python -m bench.communication"


def test_rounds_to_target_counts_from_round_zero_and_skips_missing_rounds():
    assert rounds_to([0.1, None, 0.55, 0.4], 0.5) == 2
    assert rounds_to([0.1, 0.2], 0.5) is None


def test_algorithm_summary_and_fedref_sensitivity():
    runs = [
        {
            "algorithm": "fedref",
            "seed": s,
            "final_dice_mean": d,
            "final_dice_tc": d,
            "final_dice_wt": d,
            "final_dice_et": d,
            "worst_site_dice": d - 0.1,
            "forgetting": f,
            "mb_per_round": 4.0,
            "curve": [0.2, d],
        }
        for s, d, f in ((0, 0.5, 0.1), (1, 0.7, 0.3))
    ]
    (row,) = summarise_algorithms(runs, target=0.6)
    assert row["final_dice_mean"] == pytest.approx(0.6) and row["final_dice_mean_sd"] == pytest.approx(0.1)
    assert row["reached_target"] == "1/2" and row["rounds_to_target"] == 1
    sweep = [
        {"buffer_size": p, "lambda2": l2, "final_dice_mean": d, "forgetting": 0.0}
        for p, l2, d in ((2, 0.1, 0.50), (2, 1.0, 0.40), (5, 0.1, 0.56), (5, 1.0, 0.42))
    ]
    result = sensitivity(sweep, seed_sd=0.02)
    assert result["best"]["buffer_size"] == 5 and result["best"]["lambda2"] == 0.1
    assert result["final_dice_range"] == [0.40, 0.56]
    assert result["by_lambda2"] == {"0.1": pytest.approx(0.53), "1.0": pytest.approx(0.41)}


def test_algorithms_are_compared_with_fedavg_seed_by_seed():
    def record(algorithm, seed, dice, forgetting):
        return {
            "algorithm": algorithm,
            "seed": seed,
            "final_dice_mean": dice,
            "final_dice_tc": dice,
            "final_dice_wt": dice,
            "final_dice_et": dice,
            "worst_site_dice": dice,
            "forgetting": forgetting,
            "mb_per_round": 1.0,
            "curve": [dice],
        }

    runs = [
        record("fedavg", 0, 0.50, 0.2),
        record("fedavg", 1, 0.70, 0.4),
        record("fedref", 0, 0.52, 0.1),
        record("fedref", 1, 0.66, 0.4),
    ]
    rows = {r["algorithm"]: r for r in summarise_algorithms(runs, target=0.6)}
    assert "final_dice_mean_minus_fedavg" not in rows["fedavg"]
    fedref = rows["fedref"]
    assert fedref["final_dice_mean_minus_fedavg"] == pytest.approx(-0.01)  # (+0.02 - 0.04) / 2
    assert fedref["final_dice_mean_minus_fedavg_sd"] == pytest.approx(0.03)
    assert fedref["forgetting_minus_fedavg"] == pytest.approx(-0.05)
    assert fedref["beats_fedavg_seeds"] == "1/2"


def test_site_scale_summary_leaves_out_the_first_round_and_derives_each_institution_from_the_measurements():
    from bench.site_scale import hospital_table, summarise

    raw = {
        "train_cases": 8,
        "val_cases": 2,
        "caching_seconds": 20.0,
        "cache_mb": 250.0,
        "peak_rss_mib": {"caching": 800.0, "training": 2400.0, "validation": 1600.0},
        "rounds": [
            {
                "wall_seconds": 60.0,
                "val_seconds": 30.0,
                "val_cases": 2,
                "train_seconds": 30.0,
                "steps": 5,
                "seconds_per_step": 6.0,
            },
            {
                "wall_seconds": 40.0,
                "val_seconds": 16.0,
                "val_cases": 2,
                "train_seconds": 24.0,
                "steps": 5,
                "seconds_per_step": 4.0,
            },
        ],
    }
    size = summarise(raw)
    assert size["cases"] == 10 and size["seconds_per_step"] == 4.0 and size["val_seconds_per_case"] == 8.0
    assert size["first_round_seconds"] == 60.0 and size["later_round_seconds"] == 40.0
    assert (
        size["peak_rss_mib_max"] == 2400.0
        and size["cache_mb_per_case"] == 25.0
        and size["caching_seconds_per_case"] == 2.0
    )
    rows = {
        r[0]: r
        for r in hospital_table(
            [size], steps_per_round=50, val_max_cases=8, csv_path=os.path.join(FETS_CSV_DIR, "partitioning_1.csv")
        )
    }
    assert len(rows) == 23
    # institution 1: 511 subjects -> 12.5 GiB of cache; a round = 50 x 4 s + 8 (capped) x 8 s validation = 4.4 min
    assert rows[1][1] == 511 and rows[1][3] == f"{511 * 25.0 / 1024:.1f}" and rows[1][5] == "4.4"
    # institution 9: 4 subjects -> one validation case
    assert rows[9][1] == 4 and rows[9][5] == f"{(50 * 4 + 1 * 8) / 60:.1f}"


def test_long_horizon_pairs_each_setting_with_its_own_fedavg_and_centralised_run():
    from bench.long_horizon import CENTRALISED, summarise_runs

    def record(arm, seed, k, final, auc):
        return {
            "arm": arm,
            "seed": seed,
            "clients_per_round": k,
            "final_dice_mean": final,
            "last3_dice_mean": final,
            "auc": auc,
            "forgetting": 0.0,
            "curve": [0.5, 0.75, 0.79],
            "step_ratio_mean": None,
        }

    runs = [record("fedavg", s, 2, 0.6 + 0.1 * s, 0.4) for s in range(3)]
    runs += [record("fedref_trend", s, 2, 0.6 + 0.1 * s + d, 0.4 + d) for s, d in enumerate([0.01, 0.03, 0.02])]
    runs += [
        record("fedavg", 0, 0, 0.9, 0.7),
        record(CENTRALISED, 0, 2, 0.8, 0.5),
        record(CENTRALISED, 1, 2, 0.75, 0.5),
    ]
    rows = {(r["clients_per_round"], r["arm"]): r for r in summarise_runs(runs)}
    trend = rows[(2, "fedref_trend")]
    assert trend["participation"] == "2 of 5 sites per round" and trend["seeds"] == 3
    diff = trend["final_dice_mean_minus_fedavg"]
    half = 4.303 * 0.01 / 3**0.5  # t(0.975, 2) x sd(0.01, 0.03, 0.02) / sqrt(3)
    assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx((0.02, 0.02 - half, 0.02 + half))
    assert trend["beats_fedavg_seeds"] == "3/3"
    assert trend["reached_0.8"] == "0/3" and trend["rounds_to_0.7"] == 1 and trend["reached_0.7"] == "3/3"
    # FL / centralised on the seeds that have both (0 and 1), within the same participation setting
    assert trend["fl_over_centralised"] == pytest.approx((0.61 / 0.8 + 0.73 / 0.75) / 2)
    assert rows[(0, "fedavg")]["fl_over_centralised"] is None  # no centralised run with full participation's steps
    assert rows[(2, CENTRALISED)]["seeds"] == 2


def test_network_summary_pairs_each_round_with_the_unlimited_link_of_the_same_precision():
    from bench.network import rate_bits, summarise

    def rounds(seconds, work=1.0, size=100, link=110):
        return [
            {
                "round": n,
                "seconds": s,
                "slowest_site_seconds": work,
                "rest_seconds": s - work,
                "missing": [],
                "bytes_received_by_site": {"site-1": size, "site-2": size},
                "bytes_sent_by_site": {"site-1": size, "site-2": size},
                "link_bytes_down": {"site-1": link, "site-2": link},
                "link_bytes_up": {"site-1": link, "site-2": link},
            }
            for n, s in enumerate(seconds)
        ]

    def config(precision, rate, seconds, flare=None, **kwargs):
        flare_log = {"site-1": {"download_seconds": flare, "upload_seconds": flare}} if flare else {}
        return {"precision": precision, "rate": rate, "per_round": rounds(seconds, **kwargs), "flare_log": flare_log}

    configs = [
        config("float16", "unlimited", [30.0, 4.0, 4.0], size=50, link=55),
        config("full", "20mbit", [60.0, 12.0, 10.0, 14.0], flare=[9.0, 4.0, 5.0, 3.0], link=1_250_000),
        config("full", "unlimited", [40.0, 4.0, 5.0, 4.0], flare=[2.0, 0.5, 0.5, 0.5]),
        config("float16", "20mbit", [50.0, 8.0, 6.0], size=50, link=625_000),
    ]
    rows = {(r["precision"], r["rate"]): r for r in summarise(configs)}
    assert [(r["precision"], r["rate"]) for r in summarise(configs)] == [
        ("full", "unlimited"),
        ("full", "20mbit"),
        ("float16", "unlimited"),
        ("float16", "20mbit"),
    ]
    slow = rows[("full", "20mbit")]
    # round 0 (deployment, warm-up) in no median; rounds paired by number: 12-4, 10-5, 14-4
    assert slow["rounds_summarised"] == [1, 2, 3] and slow["round0_seconds"] == 60.0
    assert slow["round_seconds"] == 12.0 and slow["transfer_seconds"] == 8.0
    assert slow["transfer_share"] == pytest.approx(8.0 / 12.0)  # the median of 8/12, 5/10, 10/14
    assert slow["round_vs_unlimited"] == pytest.approx(3.0)  # median of 3, 2, 3.5
    assert slow["rest_transfer_seconds"] == 8.0
    assert [r["transfer_seconds"] for r in slow["per_round"]] == [8.0, 5.0, 10.0]  # each round kept
    assert slow["line_seconds"] == pytest.approx(2 * 1_250_000 * 8 / 20e6)  # down + up at the link's rate
    # FLARE's own timing: round 0's transfer (the first) left out; (4 + 4) - (0.5 + 0.5)
    assert slow["flare_download_seconds"] == 4.0 and slow["flare_transfer_seconds"] == 7.0
    base = rows[("full", "unlimited")]
    assert base["transfer_seconds"] == 0.0 and base["round_vs_unlimited"] == 1.0 and base["line_seconds"] is None
    half = rows[("float16", "20mbit")]
    assert half["baseline"] == "float16 @ unlimited" and half["transfer_seconds"] == 3.0  # median of 4, 2
    assert half["bytes_received_by_site_vs_full"] == 0.5 and half["link_bytes_up_vs_full"] == 0.5
    assert rate_bits("100mbit") == 1e8 and rate_bits("unlimited") is None
    with pytest.raises(ValueError, match="a tc rate"):
        rate_bits("20 Mbit/s")
    assert rows[("float16", "20mbit")]["flare_transfer_seconds"] is None  # no log figures: none made up


def test_flare_transfer_times_are_read_from_a_site_log_model_sized_only():
    from bench.network_testbed import flare_transfers

    log = "\n".join(
        [
            "... - function - INFO - [client] download ref=ab-1 done: elapsed=4.21s size=9.2MB (9,595,016 bytes)",
            "... - _Transaction - INFO - [server] download tx Tx-1 done: status=finished elapsed=3.90s "
            "size=9.2MB (9,595,016 bytes)",
            "... - function - INFO - [client] download ref=ab-2 done: elapsed=0.01s size=0.0MB (8,295 bytes)",
            "... - _Transaction - INFO - [server] download tx Tx-2 done: status=timeout elapsed=600.00s "
            "size=9.2MB (9,595,016 bytes)",
        ]
    )
    assert flare_transfers(log) == {"download_seconds": [4.21], "upload_seconds": [3.9]}
