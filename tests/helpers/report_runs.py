"""A hand-made run folder (round records and cross-site scores) for the report tests."""

from __future__ import annotations

import json
import os

import pytest


def scores(dice: float, n: int) -> dict:
    return {
        "dice_tc": dice - 0.1,
        "dice_wt": dice + 0.1,
        "dice_et": dice - 0.2,
        "dice_mean": dice - 0.0667,
        "hd95_tc": 10.0,
        "hd95_wt": 8.0,
        "hd95_et": 12.0,
        "n_cases": n,
    }


@pytest.fixture
def run_folder(tmp_path):
    server = tmp_path / "run" / "server" / "simulate_job"
    os.makedirs(server / "cross_site_val")
    records = [
        {
            "round": r,
            "algorithm": "fedref",
            "sites": {
                "site-1": {**scores(0.3 + 0.2 * r, 3), "train_loss": 0.9},
                "site-2": {**scores(0.5 + 0.1 * r, 1), "train_loss": 0.8},
            },
        }
        for r in range(2)
    ]
    with open(server / "round_metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    cross = {
        "site-1": {"SRV_FL_global_model.pt": scores(0.8, 3), "site-1": scores(0.7, 3)},
        "site-2": {"SRV_FL_global_model.pt": scores(0.6, 1), "site-1": scores(0.4, 1)},
    }
    with open(server / "cross_site_val" / "cross_val_results.json", "w") as f:
        json.dump(cross, f)
    return tmp_path / "run"
