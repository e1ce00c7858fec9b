"""Convergence, forgetting and sensitivity on non-IID sites shaped like FeTS2022's partitioning_1.

Five synthetic institutions with partitioning_1's skew (one large, several small) and their own intensity
scale, bias field, noise and tumour sizes. Every algorithm runs the same rounds, local epochs and
network on the same prepared sites, once per seed (the seed drives initialisation and augmentation).
Then a FedRef grid over p x lambda2 (one seed each). Measures per run, from the run's artifacts: final
Dice (all validation cases), the per-round mean Dice curve, rounds to a target mean Dice, forgetting
(``fedseg.app.compare``).

Each finished run is written to the result file at once, and ``--resume`` skips the runs already in it,
so a long measurement can be spread over several sittings (the synthetic sites are the same every time).

    .venv/bin/python -m bench.convergence [--algorithms ...] [--seeds 0 1 2] [--rounds 10] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from bench.common import institutions, load_result, table, write_result

INSTITUTIONS = [  # subjects, intensity scale, bias, noise, tumour radius (mm): partitioning_1-like skew
    (16, 1000.0, 0.10, 0.03, (20, 32)),
    (8, 400.0, 0.25, 0.05, (16, 26)),
    (5, 2500.0, 0.15, 0.04, (24, 36)),
    (4, 700.0, 0.30, 0.06, (14, 22)),
    (4, 1500.0, 0.05, 0.02, (26, 38)),
]
ALGORITHMS = ["fedref", "fedavg", "fedprox", "fedadam", "scaffold"]
SETTINGS = ("algorithm", "seed", "num_rounds", "buffer_size", "lambda2")  # what tells one planned run from another


def prepare(work: str) -> str:
    """The five skewed synthetic institutions as prepared sites (the same every time: a resumed run matches)."""
    from fedseg.data_prep.fets2022 import prepare_sites
    from fedseg.data_prep.synthetic import SyntheticConfig, generate

    source = generate(os.path.join(work, "data"), SyntheticConfig(institutions=institutions(INSTITUTIONS)))
    prepare_sites(source, os.path.join(work, "sites"), validation_fraction=0.25)
    return os.path.join(work, "sites")


def incomplete_rounds(run) -> list[str]:
    """Rounds where a site's update was missing or rejected, as 'round N: site-X (why)'."""
    problems = []
    for number, record in enumerate(run.rounds):
        problems += [f"round {number}: {site} (no result)" for site in record.get("missing", [])]
        problems += [f"round {number}: {site} (rejected: {why})" for site, why in record.get("rejected", {}).items()]
    return problems


def first_complete_run(simulate, name: str, attempts: int):
    """Call ``simulate`` until it returns a run with every site in every round; say why each other try failed."""
    for attempt in range(1, attempts + 1):
        run = simulate()
        problems = incomplete_rounds(run)
        if not problems:
            return run
        print(
            f"{name}: attempt {attempt} of {attempts} lost sites ({'; '.join(problems[:3])}"
            f"{'; ...' if len(problems) > 3 else ''})",
            flush=True,
        )
    raise RuntimeError(f"{name}: a site was missing or rejected in each of {attempts} attempts")


def run_one(sites: str, work: str, attempts: int = 3, **settings) -> dict:
    """One federation with every site in every round.

    A run where a site dropped out is not a measurement of the algorithm: FLARE's simulator now and then
    loses a site's worker as it starts ("Connection reset by peer"), and the job then goes on with the
    others, each round waiting for the absent one. Such a run is reported and run again.
    """
    from fedseg.app.artifacts import load_run
    from fedseg.app.compare import summarise
    from fedseg.jobs.recipes import JobSettings, run_simulation

    job = JobSettings(
        sites=[f"site-{i}" for i in range(1, len(INSTITUTIONS) + 1)], data_root=sites, threads=1, **settings
    )
    job.name = "_".join(f"{k}{v}" for k, v in sorted(settings.items()) if k != "num_rounds")
    run = first_complete_run(lambda: load_run(run_simulation(job, os.path.join(work, "runs"))), job.name, attempts)
    summary = summarise(run, target=1.0)
    overall = summary["final"]["overall"]
    sites = [site for record in run.rounds for site in record["sites"].values()]
    return {
        **settings,
        "final_dice_mean": overall["dice_mean"],
        "bytes_up_per_site": statistics.mean(s["bytes_sent_by_site"] for s in sites),
        "bytes_down_per_site": statistics.mean(s["bytes_received_by_site"] for s in sites),
        "final_dice_tc": overall["dice_tc"],
        "final_dice_wt": overall["dice_wt"],
        "final_dice_et": overall["dice_et"],
        "worst_site_dice": min(s["dice_mean"] for s in summary["final"]["sites"].values()),
        "curve": [row["dice_mean"] for row in summary["curve"]],
        "forgetting": summary["forgetting"]["total"],
        "mb_per_round": summary["mb_per_round"],
        "wall_seconds": summary["wall_seconds"],
    }


def rounds_to(curve: list, target: float) -> int | None:
    """First round (0-based) whose global model reaches the target mean Dice."""
    return next((i for i, value in enumerate(curve) if value is not None and value >= target), None)


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values)


def summarise_algorithms(runs: list[dict], target: float) -> list[dict]:
    summary = []
    baseline = {r["seed"]: r for r in runs if r["algorithm"] == "fedavg"}
    for algorithm in dict.fromkeys(r["algorithm"] for r in runs):
        mine = [r for r in runs if r["algorithm"] == algorithm]
        row = {"algorithm": algorithm, "seeds": len(mine)}
        for key in (
            "final_dice_mean",
            "final_dice_tc",
            "final_dice_wt",
            "final_dice_et",
            "worst_site_dice",
            "forgetting",
            "mb_per_round",
        ):
            row[key], row[f"{key}_sd"] = spread([r[key] for r in mine])
        reached = [rounds_to(r["curve"], target) for r in mine]
        reached = [r for r in reached if r is not None]
        row["rounds_to_target"] = statistics.mean(reached) if reached else None
        row["reached_target"] = f"{len(reached)}/{len(mine)}"
        # the same seed gives every algorithm the same initial model and data order: compare seed by seed
        paired = [r for r in mine if r["seed"] in baseline]
        if paired and algorithm != "fedavg":
            for key in ("final_dice_mean", "forgetting"):
                row[f"{key}_minus_fedavg"], row[f"{key}_minus_fedavg_sd"] = spread(
                    [r[key] - baseline[r["seed"]][key] for r in paired]
                )
            row["beats_fedavg_seeds"] = (
                f"{sum(r['final_dice_mean'] > baseline[r['seed']]['final_dice_mean'] for r in paired)}/{len(paired)}"
            )
        summary.append(row)
    return summary


def sensitivity(sweep: list[dict], seed_sd: float) -> dict:
    """Best grid point and how much the final Dice moves across the grid, next to the seed-to-seed spread."""
    if not sweep:
        return {}
    best = max(sweep, key=lambda r: r["final_dice_mean"])
    values = [r["final_dice_mean"] for r in sweep]
    return {
        "best": {
            "buffer_size": best["buffer_size"],
            "lambda2": best["lambda2"],
            "final_dice_mean": best["final_dice_mean"],
            "forgetting": best["forgetting"],
        },
        "final_dice_range": [min(values), max(values)],
        "seed_sd_at_defaults": seed_sd,
        "by_lambda2": {
            str(l2): statistics.mean(r["final_dice_mean"] for r in sweep if r["lambda2"] == l2)
            for l2 in sorted({r["lambda2"] for r in sweep})
        },
        "by_buffer_size": {
            str(p): statistics.mean(r["final_dice_mean"] for r in sweep if r["buffer_size"] == p)
            for p in sorted({r["buffer_size"] for r in sweep})
        },
    }


def key(settings: dict) -> str:
    return json.dumps({k: settings[k] for k in sorted(settings)})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.5, help="mean Dice whose first round is reported")
    parser.add_argument("--sweep-p", type=int, nargs="*", default=[2, 3, 5])
    parser.add_argument("--sweep-lambda2", type=float, nargs="*", default=[0.1, 0.3, 1.0])
    parser.add_argument("--resume", action="store_true", help="keep the runs already in bench/results/convergence.json")
    parser.add_argument("--redo", nargs="*", default=[], help="with --resume: run these algorithms' seeds again")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    return parser.parse_args()


def kept_runs(args: argparse.Namespace) -> dict[str, dict]:
    """With --resume: the finished runs of the result file, by ``key`` of their settings.

    Only a file of the same rounds and institutions counts (another regime is not the same measurement);
    the algorithms of ``--redo`` are left out, so they run again.
    """
    old = load_result("convergence") if args.resume else {}
    as_stored = [list(i[:4]) + [list(i[4])] for i in INSTITUTIONS]  # the tuples as JSON reads them back
    if old.get("rounds") != args.rounds or old.get("institutions") != as_stored:
        return {}
    # earlier versions filled the grid's default point with a copy of the seed run: run it afresh
    seed_runs = {(tuple(r.get("curve", ())), r["wall_seconds"]) for r in old.get("runs", [])}
    grid_runs = [
        r for r in old.get("fedref_sweep_runs", []) if (tuple(r.get("curve", ())), r["wall_seconds"]) not in seed_runs
    ]
    kept = [r for r in old.get("runs", []) if r["algorithm"] not in args.redo] + grid_runs
    return {key({k: run[k] for k in run if k in SETTINGS}): run for run in kept if "curve" in run}


def planned_runs(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The seed runs (every algorithm x seed) and FedRef's p x lambda2 grid (the first seed), as run settings."""
    plan = [{"algorithm": a, "seed": s, "num_rounds": args.rounds} for a in args.algorithms for s in args.seeds]
    grid = [
        {"algorithm": "fedref", "seed": args.seeds[0], "num_rounds": args.rounds, "buffer_size": p, "lambda2": l2}
        for p in args.sweep_p
        for l2 in args.sweep_lambda2
    ]
    return plan, grid


def save(args: argparse.Namespace, runs: list[dict], sweep: list[dict], complete: bool) -> str:
    """The result file as it stands: written after every run, so that a stopped measurement can be resumed."""
    fedref_seeds = [r for r in runs if r["algorithm"] == "fedref"]
    seed_sd = spread([r["final_dice_mean"] for r in fedref_seeds])[1] if fedref_seeds else None
    return write_result(
        "convergence",
        {
            "institutions": INSTITUTIONS,
            "rounds": args.rounds,
            "target": args.target,
            "summary": summarise_algorithms(runs, args.target),
            "runs": runs,
            "fedref_sweep": [
                {k: r[k] for k in ("buffer_size", "lambda2", "final_dice_mean", "worst_site_dice", "forgetting")}
                | {"rounds_to_target": rounds_to(r["curve"], args.target)}
                for r in sweep
            ],
            "fedref_sweep_runs": sweep,
            "fedref_sensitivity": sensitivity(sweep, seed_sd),
            "complete": complete,
        },
    )


def run_plan(args: argparse.Namespace, done: dict[str, dict], plan: list[dict], grid: list[dict]):
    """Every planned run not kept from the file, in order, the file saved after each; (runs, sweep, result path).

    The sites are prepared only once a run has to happen: a fully resumed invocation costs no data.
    """
    runs: list[dict] = []
    sweep: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedseg_convergence_") as tmp:
        work = os.path.abspath(args.work or tmp)
        sites = None
        todo = [(runs, s) for s in plan] + [(sweep, s) for s in grid]
        for number, (bucket, settings) in enumerate(todo, 1):
            match = done.get(key(settings))
            if match is None:
                if sites is None:
                    sites = prepare(work)
                print(f"[{number}/{len(todo)}] {settings}", flush=True)
                extra = {k: v for k, v in settings.items() if k not in ("algorithm", "seed", "num_rounds")}
                match = run_one(
                    sites,
                    work,
                    algorithm=settings["algorithm"],
                    seed=settings["seed"],
                    num_rounds=settings["num_rounds"],
                    **extra,
                )
            bucket.append(match)
            path = save(args, runs, sweep, complete=len(runs) == len(plan) and len(sweep) == len(grid))
    return runs, sweep, path


def markdown(summary: list[dict], target: float) -> str:
    """The algorithms' table of docs/benchmarks.md."""
    return table(
        [
            "algorithm",
            "final mean Dice",
            "ET",
            "worst site",
            f"rounds to {target}",
            "forgetting",
            "MB/round",
            "Dice − fedavg (paired)",
        ],
        [
            [
                r["algorithm"],
                f"{r['final_dice_mean']:.3f} ± {r['final_dice_mean_sd']:.3f}",
                f"{r['final_dice_et']:.3f} ± {r['final_dice_et_sd']:.3f}",
                f"{r['worst_site_dice']:.3f}",
                f"{'never' if r['rounds_to_target'] is None else format(r['rounds_to_target'], '.1f')} ({r['reached_target']})",
                f"{r['forgetting']:.2f} ± {r['forgetting_sd']:.2f}",
                f"{r['mb_per_round']:.1f}",
                f"{r['final_dice_mean_minus_fedavg']:+.3f} ± {r['final_dice_mean_minus_fedavg_sd']:.3f}"
                if "final_dice_mean_minus_fedavg" in r
                else "-",
            ]
            for r in summary
        ],
    )


def sweep_markdown(sweep: list[dict], target: float) -> str:
    """FedRef's p x lambda2 grid as a table."""
    return table(
        ["p", "lambda2", "final mean Dice", f"rounds to {target}", "forgetting"],
        [
            [
                r["buffer_size"],
                r["lambda2"],
                f"{r['final_dice_mean']:.3f}",
                "never" if rounds_to(r["curve"], target) is None else rounds_to(r["curve"], target),
                f"{r['forgetting']:.2f}",
            ]
            for r in sweep
        ],
    )


def main() -> None:
    args = parse_args()
    done = kept_runs(args)
    plan, grid = planned_runs(args)
    runs, sweep, path = run_plan(args, done, plan, grid)
    print(markdown(summarise_algorithms(runs, args.target), args.target))
    print(sweep_markdown(sweep, args.target))
    print(f"written {path}")


if __name__ == "__main__":
    main()
