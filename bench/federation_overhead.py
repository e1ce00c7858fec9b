"""Federation overhead: a local training step inside a FLARE simulation vs the same MONAI loop outside it.

Same site (the demo's site-1), network, settings and thread count. Inside: a one-site FedAvg job in the
simulator, 5 rounds of 2 local epochs; per-step time from the round records (train seconds / steps).
Outside: ``SiteTrainer`` alone for the same 5 x 2 epochs. The first round (caching, warm-up) is left out
of both medians. Where a round's time goes inside the federation: training, validation of the received
model, and the rest (FLARE messaging, model (de)serialisation, aggregation).

    .venv/bin/python -m bench.federation_overhead [--data-root demo_output/sites]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from bench.common import run_python, table, write_result

OUTSIDE = r"""
import json, statistics, sys, time, torch
from fedseg.trainer import SiteTrainer, parse_args
torch.set_num_threads(1)
trainer = SiteTrainer(sys.argv[1], parse_args([]))
per_step, train, val = [], [], []
for _ in range(5):
    result = trainer.train(2)
    per_step.append(result["train_seconds"] / result["num_steps"])
    train.append(result["train_seconds"])
    val.append(trainer.validate()["val_seconds"])
print(json.dumps({"step": statistics.median(per_step[1:]), "train": statistics.median(train[1:]),
                  "val": statistics.median(val[1:])}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="demo_output/sites")
    return parser.parse_args()


def outside_flare(data_root: str) -> dict:
    """Median step, training and validation seconds of ``SiteTrainer`` alone, in a fresh one-thread process."""
    return run_python(OUTSIDE, os.path.join(data_root, "site-1"))


def inside_flare(data_root: str) -> dict:
    """The same medians from a one-site FedAvg simulation's round records (round 0 left out), and the round's."""
    from fedseg.app.artifacts import load_run
    from fedseg.jobs.recipes import JobSettings, run_simulation

    with tempfile.TemporaryDirectory() as work:
        settings = JobSettings(
            algorithm="fedavg",
            sites=["site-1"],
            num_rounds=5,
            data_root=data_root,
            threads=1,
            cross_site_eval=False,
            min_clients=1,
        )
        run = load_run(run_simulation(settings, work))
        records = run.rounds[1:]
        site = [r["sites"]["site-1"] for r in records]
        inside = {
            "step": statistics.median(s["train_seconds"] / s["num_steps"] for s in site),
            "train": statistics.median(s["train_seconds"] for s in site),
            "val": statistics.median(s["val_seconds"] for s in site),
            "round": statistics.median(r["seconds"] for r in records),
        }
    inside["rest"] = inside["round"] - inside["train"] - inside["val"]
    return inside


def markdown(inside: dict, outside: dict) -> str:
    return table(
        [
            "",
            "per training step (s)",
            "training per round (s)",
            "validation per round (s)",
            "rest of the round (s)",
        ],
        [
            [
                "inside FLARE",
                f"{inside['step']:.3f}",
                f"{inside['train']:.2f}",
                f"{inside['val']:.2f}",
                f"{inside['rest']:.2f}",
            ],
            ["outside", f"{outside['step']:.3f}", f"{outside['train']:.2f}", f"{outside['val']:.2f}", "-"],
        ],
    )


def main() -> None:
    args = parse_args()
    data_root = os.path.abspath(args.data_root)
    outside = outside_flare(data_root)
    inside = inside_flare(data_root)
    ratio = inside["step"] / outside["step"]
    path = write_result(
        "federation_overhead",
        {"inside": inside, "outside": outside, "step_ratio": ratio, "rounds": 5, "local_epochs": 2, "threads": 1},
    )
    print(markdown(inside, outside))
    print(f"step time inside / outside = {ratio:.2f}; written {path}")


if __name__ == "__main__":
    main()
