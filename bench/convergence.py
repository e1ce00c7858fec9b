"""Convergence, forgetting and sensitivity on non-IID sites shaped like FeTS2022's partitioning_1.

Five synthetic institutions with partitioning_1's skew (one large, several small) and their own intensity
scale, bias field, noise and tumour sizes. Every algorithm runs the same rounds, local epochs and
network on the same prepared sites, once per seed (the seed drives initialisation and augmentation).
Then a FedRef sweep over p and lambda2 (seed 0). Measures per run, from the run's artifacts: final
Dice (all validation cases), rounds to a target mean Dice, forgetting (``app.compare``).

    .venv/bin/python -m bench.convergence [--algorithms fedref fedavg] [--seeds 0 1 2] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from bench.common import table, write_result

INSTITUTIONS = [  # subjects, intensity scale, bias, noise, tumour radius (mm): partitioning_1-like skew
    (16, 1000.0, 0.10, 0.03, (20, 32)),
    (8, 400.0, 0.25, 0.05, (16, 26)),
    (5, 2500.0, 0.15, 0.04, (24, 36)),
    (4, 700.0, 0.30, 0.06, (14, 22)),
    (4, 1500.0, 0.05, 0.02, (26, 38)),
]


def prepare(work: str) -> str:
    from data_prep.fets2022 import prepare_sites
    from data_prep.synthetic import Institution, SyntheticConfig, generate

    config = SyntheticConfig(institutions=[
        Institution(subjects=n, intensity_scale=s, bias_strength=b, noise=z, tumour_radius_mm=r)
        for n, s, b, z, r in INSTITUTIONS])
    source = generate(os.path.join(work, "data"), config)
    prepare_sites(source, os.path.join(work, "sites"), validation_fraction=0.25)
    return os.path.join(work, "sites")


def run_one(sites: str, work: str, target: float, **settings) -> dict:
    from app.artifacts import load_run
    from app.compare import summarise
    from jobs.recipes import JobSettings, run_simulation

    job = JobSettings(sites=[f"site-{i}" for i in range(1, len(INSTITUTIONS) + 1)], data_root=sites, threads=1,
                      **settings)
    name = "_".join(f"{k}{v}" for k, v in sorted(settings.items()) if k != "num_rounds")
    job.name = name
    summary = summarise(load_run(run_simulation(job, os.path.join(work, "runs"))), target)
    overall = summary["final"]["overall"]
    return {**{k: v for k, v in settings.items()}, "final_dice_mean": overall["dice_mean"],
            "final_dice_tc": overall["dice_tc"], "final_dice_wt": overall["dice_wt"], "final_dice_et": overall["dice_et"],
            "worst_site_dice": min(s["dice_mean"] for s in summary["final"]["sites"].values()),
            "rounds_to_target": summary["rounds_to_target"], "forgetting": summary["forgetting"]["total"],
            "wall_seconds": summary["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=["fedref", "fedavg"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--sweep-p", type=int, nargs="*", default=[2, 5])
    parser.add_argument("--sweep-lambda2", type=float, nargs="*", default=[0.3, 1.0])
    args = parser.parse_args()
    runs, sweep = [], []
    with tempfile.TemporaryDirectory(prefix="fedseg_convergence_") as work:
        sites = prepare(work)
        for algorithm in args.algorithms:
            for seed in args.seeds:
                print(f"{algorithm} seed {seed}", flush=True)
                runs.append(run_one(sites, work, args.target, algorithm=algorithm, seed=seed, num_rounds=args.rounds))
        for p in args.sweep_p:
            sweep.append(run_one(sites, work, args.target, algorithm="fedref", seed=0, num_rounds=args.rounds, buffer_size=p))
        for lambda2 in args.sweep_lambda2:
            sweep.append(run_one(sites, work, args.target, algorithm="fedref", seed=0, num_rounds=args.rounds, lambda2=lambda2))
    summary = []
    for algorithm in args.algorithms:
        mine = [r for r in runs if r["algorithm"] == algorithm]
        row = {"algorithm": algorithm, "seeds": len(mine)}
        for key in ("final_dice_mean", "final_dice_tc", "final_dice_wt", "final_dice_et", "worst_site_dice", "forgetting"):
            values = [r[key] for r in mine]
            row[key] = statistics.mean(values)
            row[f"{key}_sd"] = statistics.pstdev(values)
        reached = [r["rounds_to_target"] for r in mine if r["rounds_to_target"] is not None]
        row["rounds_to_target"] = statistics.mean(reached) if reached else None
        row["reached_target"] = f"{len(reached)}/{len(mine)}"
        summary.append(row)
    path = write_result("convergence", {"institutions": INSTITUTIONS, "rounds": args.rounds, "target": args.target,
                                        "summary": summary, "runs": runs, "fedref_sweep": sweep})
    print(table(["algorithm", "final mean Dice", "ET", "worst site", "rounds to target", "forgetting"],
                [[r["algorithm"], f"{r['final_dice_mean']:.3f} ± {r['final_dice_mean_sd']:.3f}",
                  f"{r['final_dice_et']:.3f} ± {r['final_dice_et_sd']:.3f}", f"{r['worst_site_dice']:.3f}",
                  f"{r['rounds_to_target']} ({r['reached_target']})", f"{r['forgetting']:.2f} ± {r['forgetting_sd']:.2f}"]
                 for r in summary]))
    print(table(["p", "lambda2", "final mean Dice", "rounds to target", "forgetting"],
                [[r.get("buffer_size", 3), r.get("lambda2", 0.1), f"{r['final_dice_mean']:.3f}", r["rounds_to_target"],
                  f"{r['forgetting']:.2f}"] for r in sweep]))
    print(f"written {path}")


if __name__ == "__main__":
    main()
