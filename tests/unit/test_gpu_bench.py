"""The arithmetic of the step split and of the FeTS2022-sized federation (bench.step_split, bench.fets_scale)."""

from __future__ import annotations

import pytest

from bench.fets_scale import gpu_share, round_sizes, site_figures
from bench.fets_scale import summarise as summarise_federation
from bench.step_split import summarise as summarise_split


def test_step_split_shares_and_ratios_come_from_the_rounds_and_the_bare_step_of_the_same_run():
    raw = {
        "compute": {"seconds_per_step": 1.0},
        "compute_after": {"seconds_per_step": 3.0},  # the bare step: the median of before and after, 2.0
        "rounds": [
            {"setting": "0:off", "num_steps": 2, "train_seconds": 6.0, "data_seconds": 2.0, "compute_seconds": 4.0,
             "split_seconds": {"read": 0.2, "host_stage": 0.8, "loader_other": 0.2, "device_stage": 0.8}},
            {"setting": "0:on", "num_steps": 2, "train_seconds": 4.4, "data_seconds": 0.2, "compute_seconds": 4.1},
            {"setting": "0:on", "num_steps": 2, "train_seconds": 4.0, "data_seconds": 0.2, "compute_seconds": 3.7},
        ],
        "validation": {"seconds_per_case": [10.0, 2.0, 3.0], "window_shapes": [[2, 4, 8, 8, 8]]},
    }  # fmt: skip
    summary = summarise_split(raw)
    assert summary["compute_seconds_per_step"] == 2.0
    assert summary["data_share_setting"] == "0:on" and summary["data_share"] == pytest.approx(0.4 / 8.4)
    assert summary["step_vs_compute"] == pytest.approx(8.4 / 4 / 2.0)
    serial = next(s for s in summary["settings"] if s["setting"] == "0:off")
    assert serial["data_share"] == pytest.approx(2 / 6) and serial["split_seconds_per_step"]["read"] == 0.1
    assert not serial["loader_thread"] and serial["num_workers"] == 0
    assert summary["validation"]["first_vs_later"] == pytest.approx(10.0 / 2.5)


def test_a_sites_round_sizes_are_what_the_institution_works_on_in_a_round():
    sizes = round_sizes([511, 6, 40, 4, 13], cap=40)
    assert [s["cases"] for s in sizes] == [40, 6, 40, 4, 13]
    assert [s["val_cases"] for s in sizes] == [8, 1, 8, 1, 3]  # 20%, at least 1, at most the 8 a round validates


def record(number: int, sites: dict, seconds: float, end: float) -> dict:
    return {"round": number, "seconds": seconds, "time": end, "sites": sites}


def site(steps=50, train=5.0, data=0.5, val=4.0, cases=2, **extra) -> dict:
    return {
        "num_steps": steps,
        "train_seconds": train,
        "data_seconds": data,
        "val_seconds": val,
        "n_cases": cases,
        **extra,
    }


def test_federation_summary_leaves_out_round_zero_and_bounds_each_round_by_the_bare_steps():
    records = [
        record(0, {"site-1": site(val=40.0), "site-2": site(val=40.0)}, 100.0, 1000.0),
        record(1, {"site-1": site(), "site-2": site(train=10.0, data=5.0)}, 20.0, 1030.0),
        record(2, {"site-1": site(), "site-2": site(train=10.0, data=5.0)}, 22.0, 1060.0),
    ]
    summary = summarise_federation(records, bare_step=0.05)
    assert summary["compute_bound_seconds"] == pytest.approx(100 * 0.05)  # 2 sites x 50 steps x the bare step
    assert summary["round_seconds"] == 21.0 and summary["round_vs_compute_bound"] == pytest.approx(21.0 / 5.0)
    assert summary["federation_step_vs_compute"] == pytest.approx((0.1 / 0.05 + 0.2 / 0.05) / 2)
    assert summary["federation_step_vs_compute_max"] == pytest.approx(4.0)
    assert summary["data_share"] == pytest.approx((0.1 + 0.5) / 2)
    assert summary["validation_first_vs_later"] == pytest.approx(20.0 / 2.0)
    samples = [{"t": 995.0, "gpu_util": 0.0}, {"t": 1020.0, "gpu_util": 80.0}, {"t": 1050.0, "gpu_util": 60.0}]
    assert gpu_share(samples, records) == 70.0  # only the samples inside rounds 1 and 2
    with pytest.raises(ValueError):
        summarise_federation(records[:1], bare_step=0.05)


def test_each_sites_own_figures_are_its_largest_over_the_rounds():
    records = [record(0, {"site-1": site(peak_gpu_mib=900.0, warmup_seconds=4.0)}, 1, 1),
               record(1, {"site-1": site(peak_gpu_mib=1200.0, warmup_seconds=4.0)}, 1, 2)]  # fmt: skip
    assert site_figures(records) == {"site-1": {"peak_gpu_mib": 1200.0, "warmup_seconds": 4.0}}
