"""`fedseg compare --runs` on two finished runs (the shared FedRef run and FedAvg on the same sites): every
table names the winner that the runs' own artifacts give, computed here from their round records. The
command goes through the installed CLI's `main` in this process (the other CLI tests start the script)."""

from __future__ import annotations

import csv
import json

import pytest
from helpers.federations import SITES

from fedseg.app.cli import main as fedseg_main


def final_mean_dice(run) -> float:
    """Case-weighted mean Dice of the final model: cross-site evaluation when run, else the last round's."""
    if run.cross_site:
        scores = [run.cross_site[site]["SRV_FL_global_model.pt"] for site in SITES]
    else:
        scores = [run.rounds[-1]["sites"][site] for site in SITES]
    return sum(s["dice_mean"] * s["n_cases"] for s in scores) / sum(s["n_cases"] for s in scores)


def megabytes(run) -> float:
    return (
        sum(s["bytes_received_by_site"] + s["bytes_sent_by_site"] for r in run.rounds for s in r["sites"].values())
        / 1e6
    )


def winners(values: dict[str, float], better) -> list[str]:
    best = better(values.values())
    return sorted(a for a, v in values.items() if abs(v - best) <= 1e-9)


def test_compare_two_finished_runs_names_the_winner_of_each_measure(fedref_run, federation, tmp_path, capsys):
    _, fedref = fedref_run
    _, fedavg = federation(algorithm="fedavg", cross_site_eval=False, num_rounds=2)
    out = tmp_path / "comparison"
    assert fedseg_main(["compare", "--runs", fedref.folder, fedavg.folder, "--out", str(out)]) == 0
    assert f"comparison: {out / 'compare.html'}" in capsys.readouterr().out
    runs = {"fedref": fedref, "fedavg": fedavg}
    dice = {a: final_mean_dice(r) for a, r in runs.items()}
    mb = {a: megabytes(r) for a, r in runs.items()}
    assert mb["fedref"] == mb["fedavg"] > 0  # the same model each way: a tie, both win

    with open(out / "compare.csv", newline="") as f:
        rows = {row["measure"]: row for row in csv.DictReader(f)}
    assert float(rows["final_dice_mean"]["fedref"]) == pytest.approx(dice["fedref"])
    assert float(rows["final_dice_mean"]["fedavg"]) == pytest.approx(dice["fedavg"])
    assert rows["final_dice_mean"]["winners"].split() == winners(dice, max)
    assert float(rows["mb_total"]["fedref"]) == pytest.approx(mb["fedref"])
    assert rows["mb_total"]["winners"].split() == ["fedavg", "fedref"]

    report = json.loads((out / "compare.json").read_text())
    by_measure = {w["measure"]: w for w in report["winners"]}
    assert by_measure["final_dice_mean"]["winners"] == winners(dice, max)
    walls = {a: r.run_info["wall_seconds"] for a, r in runs.items()}
    assert by_measure["wall_seconds"]["winners"] == [min(walls, key=walls.get)]
    who = " and ".join(winners(dice, max))
    assert f"final mean Dice: {who} won ({max(dice.values()):.3f})." in report["sentences"]
    page = (out / "compare.html").read_text(encoding="utf-8")
    assert f"<b>{max(dice.values()):.3f}</b>" in page  # the winner's value in bold in the table
