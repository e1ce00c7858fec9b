"""Site cost per local round for each algorithm: seconds and peak memory, in fresh processes.

FedRef, FedAvg, FedAdam and FedAvgM run the identical site code (plain local training; their
difference is on the server), FedProx adds the proximal term, Scaffold NVFlare's control-variate helper.
Each variant trains the demo's site-1 for 4 local rounds of 2 epochs with the demo's settings; the first
round (caching, warm-up) is left out of the median. Baseline: the plain local round.

    .venv/bin/python -m bench.site_cost [--site demo_output/sites/site-1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.common import table, write_result

WORKER = r"""
import json, resource, statistics, sys, time, torch
from fedseg.trainer import SiteTrainer, ScaffoldState, parse_args
torch.set_num_threads(1)
variant, folder = sys.argv[1], sys.argv[2]
args = parse_args([])
trainer = SiteTrainer(folder, args)
scaffold = ScaffoldState(trainer) if variant == "scaffold" else None
seconds = []
for _ in range(4):
    global_state = trainer.state()
    started = time.perf_counter()
    if scaffold is not None:
        controls = {k: torch.zeros_like(v).numpy() for k, v in trainer.model.named_parameters()}
        scaffold.train(controls)  # the settings' local_epochs: 2
    else:
        trainer.train(2, fedprox_mu=0.01 if variant == "fedprox" else 0.0)
    seconds.append(time.perf_counter() - started)
print(json.dumps({"seconds": statistics.median(seconds[1:]),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

VARIANTS = [("plain (fedref, fedavg, fedadam, fedavgm)", "plain"), ("fedprox", "fedprox"), ("scaffold", "scaffold")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", default="demo_output/sites/site-1")
    args = parser.parse_args()
    rows = []
    for label, variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, "-c", WORKER, variant, args.site], check=True, capture_output=True, text=True
        ).stdout
        rows.append({"algorithms": label, **json.loads(out.strip().splitlines()[-1])})
    for row in rows:
        row["vs_plain"] = row["seconds"] / rows[0]["seconds"]
    path = write_result("site_cost", {"site": args.site, "local_epochs": 2, "threads": 1, "rows": rows})
    print(
        table(
            ["algorithms", "seconds per local round", "peak RSS (MiB)", "time vs plain"],
            [
                [r["algorithms"], f"{r['seconds']:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['vs_plain']:.2f}"]
                for r in rows
            ],
        )
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
