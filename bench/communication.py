"""Communication: bytes per round per site at full precision and through NVFlare's quantisation filters,
and what the compression costs in Dice.

The same FedRef federation (bench.convergence's five skewed sites, same rounds and seeds) runs once per
transfer mode: full precision and ``float16`` (NVFlare's ModelQuantizer/ModelDequantizer on the training
task, both ways); ``blockwise8`` and the 4-bit types need a GPU (``--modes ... blockwise8`` there).
``adaquant`` is refused by JobSettings: measured here, it turned every update into NaN (fedseg.wire). Bytes are what the server's
WireSizeMeter saw on the wire (tensor payload and quantisation state, before serialisation overhead);
the Dice difference is paired by seed against the full-precision run, final global model on all
validation cases. Training in the simulator is not bit-for-bit repeatable (sites finish in varying order,
and the sums change in the last bits), so a second full-precision run per seed (``full-repeat``) gives
the noise floor the compressed runs' differences are to be read against.

    .venv/bin/python -m bench.communication [--modes full full-repeat float16] [--seeds 0 1] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from bench.common import table, write_result
from bench.convergence import prepare, run_one

TARGETS = {"bytes_ratio_at_most": 0.5, "dice_difference_within": 0.01}


def summarise_modes(runs: list[dict]) -> list[dict]:
    full = {r["seed"]: r for r in runs if r["mode"] == "full"}
    rows = []
    for mode in dict.fromkeys(r["mode"] for r in runs):
        mine = [r for r in runs if r["mode"] == mode]
        row = {
            "mode": mode,
            "seeds": len(mine),
            "bytes_up_per_site": statistics.mean(r["bytes_up_per_site"] for r in mine),
            "bytes_down_per_site": statistics.mean(r["bytes_down_per_site"] for r in mine),
            "final_dice_mean": statistics.mean(r["final_dice_mean"] for r in mine),
            "wall_seconds": statistics.mean(r["wall_seconds"] for r in mine),
        }
        paired = [r["final_dice_mean"] - full[r["seed"]]["final_dice_mean"] for r in mine if r["seed"] in full]
        if full and paired:
            full_bytes = statistics.mean(full[s]["bytes_up_per_site"] + full[s]["bytes_down_per_site"] for s in full)
            row["bytes_ratio"] = (row["bytes_up_per_site"] + row["bytes_down_per_site"]) / full_bytes
            row["dice_difference"] = statistics.mean(paired)
            row["dice_difference_sd"] = statistics.pstdev(paired)
            row["dice_difference_max_abs"] = max(abs(d) for d in paired)
            within = abs(row["dice_difference"]) <= TARGETS["dice_difference_within"]
            small = row["bytes_ratio"] <= TARGETS["bytes_ratio_at_most"]
            row["meets_targets"] = None if mode.startswith("full") else small and within
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["full", "full-repeat", "float16"])
    parser.add_argument("--algorithm", default="fedref")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedseg_communication_") as tmp:
        work = os.path.abspath(args.work or tmp)
        sites = prepare(work)
        plan = [(mode, seed) for seed in args.seeds for mode in args.modes]
        for number, (mode, seed) in enumerate(plan, 1):
            print(f"[{number}/{len(plan)}] {args.algorithm} seed {seed}, transfer {mode}", flush=True)
            extra = {} if mode.startswith("full") else {"quantization": mode}
            run = run_one(sites, work, algorithm=args.algorithm, seed=seed, num_rounds=args.rounds, **extra)
            runs.append({**run, "mode": mode})
            summary = summarise_modes(runs)
            path = write_result(
                "communication",
                {
                    "algorithm": args.algorithm,
                    "rounds": args.rounds,
                    "targets": TARGETS,
                    "summary": summary,
                    "runs": runs,
                    "complete": number == len(plan),
                },
            )
    print(
        table(
            [
                "transfer",
                "up MB/round/site",
                "down MB/round/site",
                "bytes vs full",
                "final mean Dice",
                "Dice - full (paired by seed)",
                "targets met",
            ],
            [
                [
                    r["mode"],
                    f"{r['bytes_up_per_site'] / 2**20:.2f}",
                    f"{r['bytes_down_per_site'] / 2**20:.2f}",
                    f"{r.get('bytes_ratio', 1.0):.2f}",
                    f"{r['final_dice_mean']:.3f}",
                    f"{r.get('dice_difference', 0.0):+.4f} ± {r.get('dice_difference_sd', 0.0):.4f}",
                    "-" if r.get("meets_targets") is None else r["meets_targets"],
                ]
                for r in summary
            ],
        )
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
