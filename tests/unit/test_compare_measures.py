"""`fedseg compare`'s long-horizon measures from hand-made runs: area under the curve, the paired difference to
FedAvg with its 95% interval, and the participation setting, each checked against a computation done here."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest

from fedseg.app.compare import paired_interval, write_comparison

SITES = ["site-1", "site-2", "site-3"]


def scores(dice: float) -> dict:
    return {"dice_tc": dice, "dice_wt": dice, "dice_et": dice, "dice_mean": dice, "n_cases": 1}


def make_run(root, name: str, algorithm: str, seed: int, curve: list[float], variant: str = "trend") -> str:
    """A run of 2-of-3 participation: the two trainers score ``d``, the absent site ``d - 0.3`` (validation only)."""
    folder = root / name
    server = folder / "server" / "simulate_job"
    os.makedirs(server)
    records = []
    for r, d in enumerate(curve):
        trained = SITES[:2] if r % 2 == 0 else SITES[1:]
        absent = [s for s in SITES if s not in trained][0]
        records.append(
            {
                "round": r,
                "algorithm": algorithm,
                "participants": trained,
                "sites": {s: {**scores(d), "train_loss": 0.5} for s in trained},
                "validation_only": {absent: scores(d - 0.3)},
            }
        )
    (server / "round_metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    settings = {"algorithm": algorithm, "seed": seed, "sites": SITES, "clients_per_round": 2, "fedref_variant": variant}
    (folder / "run.json").write_text(json.dumps({"settings": settings, "wall_seconds": 10.0}))
    return str(folder)


def pooled_curve(curve: list[float]) -> list[float]:
    return [(2 * d + (d - 0.3)) / 3 for d in curve]  # every site's one case, the absent one included


def test_area_under_curve_paired_interval_and_participation(tmp_path):
    fedavg = {0: [0.2, 0.4, 0.5, 0.6], 1: [0.3, 0.4, 0.6, 0.6], 2: [0.2, 0.5, 0.5, 0.7]}
    trend = {0: [0.2, 0.5, 0.6, 0.6], 1: [0.3, 0.4, 0.6, 0.7], 2: [0.2, 0.6, 0.7, 0.7]}
    folders = [make_run(tmp_path, f"fedavg_{s}", "fedavg", s, c) for s, c in fedavg.items()]
    folders += [make_run(tmp_path, f"trend_{s}", "fedref", s, c, variant="mean") for s, c in trend.items()]
    index = write_comparison(folders, str(tmp_path / "out"), target=0.3)
    result = json.loads((tmp_path / "out" / "compare.json").read_text())

    assert result["participation"] == "2 of 3 sites per round"
    auc = {r["algorithm"]: r["auc"] for r in result["runs"]}
    assert sorted(auc) == ["fedavg", "fedref-mean"]  # a FedRef variant other than the default is named as such
    run_auc = {(r["algorithm"], r["seed"]): r["auc"] for r in result["runs"]}
    for seed, curve in trend.items():
        assert run_auc[("fedref-mean", seed)] == pytest.approx(statistics.mean(pooled_curve(curve)))
    winners = {w["measure"]: w for w in result["winners"]}
    assert winners["auc"]["values"]["fedavg"] == pytest.approx(
        statistics.mean(statistics.mean(pooled_curve(c)) for c in fedavg.values())
    )
    assert winners["auc"]["winners"] == ["fedref-mean"]
    assert winners["last3_dice_mean"]["values"]["fedavg"] == pytest.approx(
        statistics.mean(statistics.mean(pooled_curve(c)[-3:]) for c in fedavg.values())
    )

    diffs = [statistics.mean(pooled_curve(trend[s])) - statistics.mean(pooled_curve(fedavg[s])) for s in fedavg]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    paired = {(p["algorithm"], p["measure"]): p for p in result["paired_differences"]}
    row = paired[("fedref-mean", "auc")]
    assert row["n"] == 3 and row["mean"] == pytest.approx(mean)
    assert row["low"] == pytest.approx(mean - 4.303 * sd / math.sqrt(3))  # t(0.975, 2 df)
    assert row["high"] == pytest.approx(mean + 4.303 * sd / math.sqrt(3))

    page = open(index, encoding="utf-8").read()
    assert "2 of 3 sites per round" in page and "area under the Dice curve" in page
    assert f"{mean:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]" in page


def test_one_seed_gives_a_difference_without_an_interval(tmp_path):
    folders = [make_run(tmp_path, "a", "fedavg", 0, [0.2, 0.4]), make_run(tmp_path, "b", "fedref", 0, [0.3, 0.4])]
    index = write_comparison(folders, str(tmp_path / "out"), target=0.3)
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    row = {p["measure"]: p for p in result["paired_differences"] if p["algorithm"] == "fedref"}["final_dice_mean"]
    assert row["n"] == 1 and row["low"] is None
    assert "one seed: no interval" in open(index, encoding="utf-8").read()


def test_paired_interval_uses_the_t_quantile_of_its_degrees_of_freedom():
    got = paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * statistics.stdev([1, 2, 3, 4, 5]) / math.sqrt(5)
    assert (got["mean"], got["low"], got["high"]) == pytest.approx((3.0, 3.0 - half, 3.0 + half))


def test_run_report_names_the_participation_and_the_area_under_the_curve(tmp_path):
    from fedseg.app.artifacts import load_run
    from fedseg.app.report import write_report

    curve = [0.2, 0.4, 0.5, 0.6]
    index = write_report(load_run(make_run(tmp_path, "run", "fedavg", 0, curve)), str(tmp_path / "report"))
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["participation"] == "2 of 3 sites per round"
    assert summary["auc"] == pytest.approx(statistics.mean(pooled_curve(curve)))
    assert summary["last3_dice_mean"] == pytest.approx(statistics.mean(pooled_curve(curve)[-3:]))
    # the final scores cover the absent site too (it validated the last global model)
    assert sorted(summary["final"]["sites"]) == SITES
    page = open(index, encoding="utf-8").read()
    assert "2 of 3 sites per round" in page and f"{summary['auc']:.3f}" in page
