"""The federation-scale table is computed from round records: check its arithmetic on handmade records."""

from __future__ import annotations

import pytest

from bench.federation_scale import lost_sites, partition_ids, round_breakdown, summarise_rounds, with_ratios

SITES = ["site-1", "site-2", "site-3"]


def record(number: int, seconds: float, end: float, work: dict[str, tuple[float, float]], **extra) -> dict:
    """A round record as the controller writes it: per site train and validation seconds."""
    return {
        "round": number,
        "seconds": seconds,
        "time": end,
        "missing": [],
        "rejected": {},
        "sites": {s: {"train_seconds": t, "val_seconds": v, "dice_mean": 0.5} for s, (t, v) in work.items()},
        **extra,
    }


def rounds() -> list[dict]:
    return [
        record(0, 30.0, 100.0, {"site-1": (9.0, 1.0), "site-2": (8.0, 1.0), "site-3": (7.0, 1.0)}),  # start-up
        record(1, 3.0, 103.5, {"site-1": (0.5, 0.2), "site-2": (0.6, 0.4), "site-3": (0.1, 0.1)}),
        record(2, 4.0, 108.0, {"site-1": (1.0, 0.5), "site-2": (0.2, 0.1), "site-3": (0.3, 0.1)}),
        record(3, 5.0, 113.2, {"site-1": (0.4, 0.1), "site-2": (0.2, 0.1), "site-3": (2.0, 0.5)}),
    ]


def test_a_round_is_split_into_the_slowest_sites_work_and_the_rest():
    part = round_breakdown(rounds()[1])
    assert part["slowest_site"] == "site-2"
    assert part["slowest_site_seconds"] == pytest.approx(1.0)  # 0.6 train + 0.4 validation
    assert part["rest_seconds"] == pytest.approx(2.0)
    assert part["median_site_seconds"] == pytest.approx(0.7)


def test_medians_leave_round_zero_out():
    summary = summarise_rounds(rounds(), SITES)
    assert summary["rounds_summarised"] == [1, 2, 3]
    assert summary["round0_seconds"] == 30.0 and summary["round0_slowest_site_seconds"] == pytest.approx(10.0)
    assert summary["round_seconds"] == pytest.approx(4.0)  # median of 3, 4, 5: not 30 from round 0
    assert summary["slowest_site_seconds"] == pytest.approx(1.5)  # median of 1.0, 1.5, 2.5
    assert summary["rest_seconds"] == pytest.approx(2.5)  # median of 2.0, 2.5, 2.5
    assert summary["rest_per_site_seconds"] == pytest.approx(2.5 / 3)
    # gap before round r = its start (end - seconds) - the previous record's time; the gap after round 0 is out
    assert summary["gap_seconds"] == pytest.approx(0.35)  # median of 104.0 - 103.5 and 108.2 - 108.0
    assert summary["lost"] == []


def test_the_rest_is_the_median_of_each_rounds_rest_not_a_difference_of_medians():
    records = [
        rounds()[0],
        record(1, 10.0, 110.0, {"site-1": (1.0, 0.0)}),
        record(2, 2.0, 112.5, {"site-1": (1.5, 0.0)}),
        record(3, 3.0, 115.6, {"site-1": (0.1, 0.0)}),
    ]
    summary = summarise_rounds(records, ["site-1"])
    # rests 9.0, 0.5, 2.9 -> 2.9 (median round 3.0 - median work 1.0 would say 2.0)
    assert summary["rest_seconds"] == pytest.approx(2.9)


def test_a_site_missing_from_a_record_is_detected():
    records = rounds()
    del records[2]["sites"]["site-3"]  # dropped out without being listed as missing
    records[3]["missing"] = ["site-2"]
    records[3]["rejected"] = {"site-1": "NaN in conv.bias"}
    assert lost_sites(records, SITES) == [
        "round 2: site-3 (no result)",
        "round 3: site-2 (no result)",
        "round 3: site-1 (rejected: NaN in conv.bias)",
    ]
    assert lost_sites(rounds(), SITES) == []
    assert summarise_rounds(records, SITES)["lost"][0] == "round 2: site-3 (no result)"
    # a round-0 loss (the simulator's start race) counts too, though round 0 is out of the medians
    records = rounds()
    del records[0]["sites"]["site-1"]
    assert lost_sites(records, SITES) == ["round 0: site-1 (no result)"]


def test_only_round_zero_cannot_be_summarised():
    with pytest.raises(ValueError, match="round 0"):
        summarise_rounds(rounds()[:1], SITES)


def test_ratios_are_against_the_smallest_federation_of_the_same_invocation():
    def row(sites, round_s, rest, slowest, round0, pss):
        return {
            "sites": sites,
            "round_seconds": round_s,
            "rest_seconds": rest,
            "slowest_site_seconds": slowest,
            "round0_seconds": round0,
            "peak_memory": {"pss_mib": pss},
        }

    rows = [
        row(23, 9.0, 6.0, 3.0, 90.0, 10500.0),
        row(3, 3.0, 2.0, 1.0, 18.0, 2500.0),
        row(8, 4.5, 3.0, 1.5, 36.0, 4500.0),
    ]
    by_sites = {r["sites"]: r for r in with_ratios(rows)}
    assert by_sites[3]["round_seconds_ratio"] == 1.0 and by_sites[3]["ratio_base_sites"] == 3
    assert by_sites[23]["round_seconds_ratio"] == pytest.approx(3.0)
    assert by_sites[23]["rest_seconds_ratio"] == pytest.approx(3.0)
    assert by_sites[8]["slowest_site_seconds_ratio"] == pytest.approx(1.5)
    assert by_sites[23]["round0_seconds_ratio"] == pytest.approx(5.0)
    assert by_sites[23]["pss_mib_per_added_site"] == pytest.approx(400.0)  # (10500 - 2500) / (23 - 3)
    assert "pss_mib_per_added_site" not in by_sites[3]


def test_partitioning_1_has_23_institutions(official_csv):
    assert partition_ids(official_csv("partitioning_1.csv")) == list(range(1, 24))
