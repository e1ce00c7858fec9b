"""Long-horizon comparison: FedRef variants against FedAvg, FedAvgM and FedProx, full and partial participation.

The five FeTS-skewed synthetic institutions of ``bench.convergence`` (one large, several small, each with its
own intensity scale, bias, noise and tumour sizes), every algorithm on the same prepared sites, once per
seed and participation setting: the seed fixes the initial model, the augmentation and, with partial
participation, the sequence of sites per round (the same for every algorithm), so differences are paired.
A centralised baseline trains one "site" holding the pooled training cases for the same number of
optimiser steps as the federation of each participation setting (rounds x sites per round x local steps)
and is scored on the pooled validation cases: FL Dice / centralised Dice says how much federation costs here.

Per run, from its artifacts (``fedseg.app.compare``): final mean Dice (the last round's global model on
every validation case of every site), the mean of the last three rounds' curve, rounds to two targets, the area
under the Dice curve (mean over rounds), forgetting, and FedRef's step ratio. Per algorithm and setting: the
paired difference to FedAvg over seeds with a 95% t-interval.

Costs are kept small on purpose (the ``--profile`` below: a 3-level U-Net of 8-16-32 channels, 32^3 crops,
a few local steps): the regime -- skewed sites, a still-rising curve at round 10, forgetting when a site is
absent -- is what is measured, not absolute Dice. Each finished run is written to the result file at once;
``--resume`` keeps the runs already there, so the full plan can be spread over sittings.

    .venv/bin/python -m bench.long_horizon --seeds 0 1 2 3 4 --rounds 35 --resume           # the full plan
    .venv/bin/python -m bench.long_horizon --screening --seeds 0 --rounds 20 --resume       # a screening pass

The full plan (7 arms x 2 settings x 5 seeds + 10 centralised runs, 35 rounds) is 80 runs. On a 2-core
machine (measured, shared with other work) a round takes about 6 s with 2 of 5 sites, 10 s with all 5 and
15 s for the centralised run of full participation's steps, plus about 20 s per run to start: about 7 hours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from bench.common import json_ready, load_result, table, write_result
from bench.convergence import INSTITUTIONS, first_complete_run, prepare, rounds_to
from fedseg.app.compare import paired_interval  # the same 95% t-interval as `fedseg compare`

RESULT_NAME = "long_horizon"
SCREENING_NAME = "long_horizon_screening"
# (arm name, JobSettings overrides): the FedRef variants with their own lambdas (see docs/benchmarks.md)
ARMS = {
    "fedavg": {"algorithm": "fedavg"},
    "fedavgm": {"algorithm": "fedavgm"},  # the project's FedAvgM: server lr 1, momentum 0.9
    "fedprox": {"algorithm": "fedprox"},
    # FedRef's defaults before this benchmark: the mean prior, p 3, lambda1 = lambda2 = 0.1
    "fedref_mean": {"algorithm": "fedref", "fedref_variant": "mean", "lambda1": 0.1, "lambda2": 0.1},
    "fedref_trend": {"algorithm": "fedref", "fedref_variant": "trend", "lambda1": 0.0, "lambda2": 0.3},
    "fedref_diagonal": {"algorithm": "fedref", "fedref_variant": "diagonal", "lambda1": 0.0, "lambda2": 1.0},
    "fedref_momentum": {
        "algorithm": "fedref",
        "fedref_variant": "trend",
        "fedref_momentum": 0.5,
        "lambda1": 0.0,
        "lambda2": 0.3,
    },
}
SCREENING_ARMS = ["fedavg", "fedavgm", "fedprox", "fedref_mean", "fedref_trend", "fedref_diagonal"]
CENTRALISED = "centralised"
# the cheap regime of every run (TrainingSettings fields); local_steps per site per round
PROFILE = {
    "channels": (8, 16, 32),
    "crop": (32, 32, 32),
    "local_steps": 8,
    "batch_size": 2,
    "samples_per_case": 2,
    "val_max_cases": 0,
    "sw_batch_size": 4,
    "lr": 3e-3,
}
TARGETS = (0.7, 0.8)  # mean Dice; this profile passes 0.5 within 3-4 rounds, so lower targets tell nothing apart


def area_under_curve(curve: list) -> float | None:
    """Mean Dice over the rounds (as ``fedseg.app.compare.area_under_curve``, on a list of values)."""
    values = [v for v in curve if v is not None]
    return statistics.mean(values) if values else None


def last_mean(curve: list, count: int = 3) -> float | None:
    values = [v for v in curve if v is not None][-count:]
    return statistics.mean(values) if values else None


def pooled_site(sites_root: str, out_root: str) -> str:
    """One site folder holding every site's training and validation cases (absolute paths): the centralised baseline."""
    from fedseg.data import DATALIST_NAME

    pooled = {"training": [], "validation": []}
    for name in sorted(os.listdir(sites_root)):
        path = os.path.join(sites_root, name, DATALIST_NAME)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            datalist = json.load(f)
        folder = os.path.join(sites_root, name)
        for split in pooled:
            for case in datalist.get(split, []):
                absolute = {
                    k: ([os.path.join(folder, p) for p in v] if isinstance(v, list) else os.path.join(folder, v))
                    if k in ("image", "label")
                    else v
                    for k, v in case.items()
                }
                pooled[split].append(absolute)
    site = os.path.join(out_root, "site-1")
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(site, DATALIST_NAME), "w", encoding="utf-8") as f:
        json.dump(pooled, f)
    return out_root


def run_arm(data_root: str, work: str, arm: str, seed: int, rounds: int, clients_per_round: int) -> dict:
    """One federation (or the centralised run) and its measures."""
    from fedseg.app.artifacts import load_run
    from fedseg.app.compare import summarise
    from fedseg.jobs.recipes import JobSettings, run_simulation

    started = time.time()
    if arm == CENTRALISED:  # as many optimiser steps per round as the federation's sites take together
        sites = ["site-1"]
        overrides = {
            "algorithm": "fedavg",
            "local_steps": PROFILE["local_steps"] * (clients_per_round or len(INSTITUTIONS)),
        }
    else:
        sites = [f"site-{i}" for i in range(1, len(INSTITUTIONS) + 1)]
        overrides = dict(ARMS[arm], clients_per_round=clients_per_round)
    settings = {**PROFILE, **overrides}
    # no cross-site evaluation (it would double a short run's cost): the final model is the last round's
    # global model, which every site validates (absent sites through their validate task)
    job = JobSettings(
        sites=sites,
        data_root=data_root,
        threads=1,
        seed=seed,
        num_rounds=rounds,
        cross_site_eval=False,
        name=f"{arm}_k{clients_per_round}_s{seed}",
        **settings,
    )
    run = first_complete_run(lambda: load_run(run_simulation(job, os.path.join(work, "runs"))), job.name, 3)
    summary = summarise(run, target=TARGETS[0])
    curve = [row["dice_mean"] for row in summary["curve"] if row["source"] == "round_validation"]
    ratios = [r["fedref"].get("step_ratio") for r in run.rounds if r.get("fedref", {}).get("applied")]
    ratios = [r for r in ratios if r is not None]
    return {
        "arm": arm,
        "seed": seed,
        "clients_per_round": clients_per_round,
        "rounds": rounds,
        "final_dice_mean": summary["final"]["overall"]["dice_mean"],
        "final_source": summary["final"]["source"],
        "last3_dice_mean": last_mean(curve),
        "auc": area_under_curve(curve),
        "forgetting": summary["forgetting"]["total"],
        "curve": curve,
        "participants": [r.get("participants") for r in run.rounds],
        "step_ratio_mean": statistics.mean(ratios) if ratios else None,
        "settings": json_ready(settings),
        "wall_seconds": time.time() - started,
    }


MEASURES = ("final_dice_mean", "last3_dice_mean", "auc", "forgetting")


def summarise_runs(runs: list[dict]) -> list[dict]:
    """Per (participation, arm): means over seeds and paired differences to FedAvg with 95% t-intervals."""
    out = []
    for k in sorted({r["clients_per_round"] for r in runs}):
        central = {r["seed"]: r for r in runs if r["arm"] == CENTRALISED and r["clients_per_round"] == k}
        setting = [r for r in runs if r["clients_per_round"] == k and r["arm"] != CENTRALISED]
        baseline = {r["seed"]: r for r in setting if r["arm"] == "fedavg"}
        for arm in dict.fromkeys(r["arm"] for r in setting):
            mine = [r for r in setting if r["arm"] == arm]
            row = {"participation": participation_label(k), "clients_per_round": k, "arm": arm, "seeds": len(mine)}
            for m in MEASURES:
                row[m] = statistics.mean(r[m] for r in mine)
            for t in TARGETS:  # from the stored curves: targets can be changed after the runs
                reached = [rounds_to(r["curve"], t) for r in mine if rounds_to(r["curve"], t) is not None]
                row[f"rounds_to_{t}"] = statistics.mean(reached) if reached else None
                row[f"reached_{t}"] = f"{len(reached)}/{len(mine)}"
            ratios = [r["step_ratio_mean"] for r in mine if r.get("step_ratio_mean") is not None]
            row["step_ratio_mean"] = statistics.mean(ratios) if ratios else None
            paired_central = [
                r["final_dice_mean"] / central[r["seed"]]["final_dice_mean"]
                for r in mine
                if r["seed"] in central and central[r["seed"]]["final_dice_mean"]
            ]
            row["fl_over_centralised"] = statistics.mean(paired_central) if paired_central else None
            row["fl_over_centralised_seeds"] = len(paired_central)
            paired = [r for r in mine if r["seed"] in baseline]
            if arm != "fedavg" and paired:
                for m in MEASURES:
                    row[f"{m}_minus_fedavg"] = paired_interval([r[m] - baseline[r["seed"]][m] for r in paired])
                row["beats_fedavg_seeds"] = (
                    f"{sum(r['final_dice_mean'] > baseline[r['seed']]['final_dice_mean'] for r in paired)}"
                    f"/{len(paired)}"
                )
            out.append(row)
        if central:
            row = {
                "participation": f"pooled data, the steps of {participation_label(k)}",
                "clients_per_round": k,
                "arm": CENTRALISED,
                "seeds": len(central),
            }
            for m in MEASURES:
                row[m] = statistics.mean(r[m] for r in central.values())
            out.append(row)
    return out


def participation_label(k: int) -> str:
    return f"all {len(INSTITUTIONS)} sites every round" if not k else f"{k} of {len(INSTITUTIONS)} sites per round"


def interval_text(interval: dict | None) -> str:
    if not interval:
        return "-"
    if interval["low"] is None:
        return f"{interval['mean']:+.3f} (1 seed)"
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def markdown(summary: list[dict]) -> str:
    def fmt(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    return table(
        [
            "participation",
            "arm",
            "seeds",
            "final Dice",
            "last-3 mean",
            "AUC",
            f"rounds to {TARGETS[0]}",
            f"rounds to {TARGETS[1]}",
            "forgetting",
            "step ratio",
            "FL / central",
            "final − FedAvg [95% CI]",
            "AUC − FedAvg [95% CI]",
        ],
        [
            [
                r["participation"],
                r["arm"],
                r["seeds"],
                fmt(r["final_dice_mean"]),
                fmt(r["last3_dice_mean"]),
                fmt(r["auc"]),
                "-"
                if r.get(f"rounds_to_{TARGETS[0]}") is None
                else f"{r[f'rounds_to_{TARGETS[0]}']:.1f} ({r[f'reached_{TARGETS[0]}']})",
                "-"
                if r.get(f"rounds_to_{TARGETS[1]}") is None
                else f"{r[f'rounds_to_{TARGETS[1]}']:.1f} ({r[f'reached_{TARGETS[1]}']})",
                fmt(r["forgetting"], 2),
                fmt(r.get("step_ratio_mean"), 2),
                (
                    f"{r['fl_over_centralised']:.2f} ({r['fl_over_centralised_seeds']} seed{'s' if r['fl_over_centralised_seeds'] > 1 else ''})"
                    if r.get("fl_over_centralised") is not None
                    else "-"
                ),
                interval_text(r.get("final_dice_mean_minus_fedavg")),
                interval_text(r.get("auc_minus_fedavg")),
            ]
            for r in summary
        ],
    )


def run_key(arm: str, seed: int, k: int, rounds: int) -> str:
    return f"{arm}|k{k}|s{seed}|r{rounds}"


def parse_args() -> argparse.Namespace:
    """The options; ``name`` (the result file) and ``arm_names`` (the arms to run) follow from --screening."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=None, choices=list(ARMS), help="default: every arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=35)
    parser.add_argument(
        "--participation", type=int, nargs="+", default=[2, 0], help="sites per round; 0: every site every round"
    )
    parser.add_argument("--no-centralised", action="store_true")
    parser.add_argument(
        "--screening",
        action="store_true",
        help=f"write {SCREENING_NAME}.json (default arms: {' '.join(SCREENING_ARMS)})",
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the result file")
    parser.add_argument(
        "--order",
        choices=["seed", "arm"],
        default="seed",
        help="seed: finish every arm of a seed before the next (paired seeds accumulate)",
    )
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args()
    args.name = SCREENING_NAME if args.screening else RESULT_NAME
    args.arm_names = args.arms or (SCREENING_ARMS if args.screening else list(ARMS))
    return args


def kept_runs(args: argparse.Namespace) -> dict[str, dict]:
    """With --resume: every run already in the result file (any rounds, seeds, arms), by ``run_key``."""
    old = load_result(args.name) if args.resume else {}
    return {run_key(r["arm"], r["seed"], r["clients_per_round"], r["rounds"]): r for r in old.get("runs", [])}


def planned_runs(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(arm, seed, sites per round) in the order they run: by seed, or with --order arm by arm."""
    plan = []
    for seed in args.seeds:
        for k in args.participation:
            plan += [] if args.no_centralised else [(CENTRALISED, seed, k)]
            plan += [(arm, seed, k) for arm in args.arm_names]
    if args.order == "arm":
        plan.sort(key=lambda item: (item[0] != CENTRALISED, item[2], item[0], item[1]))
    return plan


def save(args: argparse.Namespace, runs: dict[str, dict], plan: list[tuple[str, int, int]]) -> str:
    """The result file as it stands: every run kept (an earlier sitting may have run other seeds, arms or
    settings), the summary of those with this invocation's rounds."""
    done = sorted(runs.values(), key=lambda r: (r["rounds"], r["clients_per_round"], r["seed"], r["arm"]))
    missing = [item for item in plan if run_key(*item, args.rounds) not in runs]
    return write_result(
        args.name,
        {
            "screening": args.screening,
            "institutions": INSTITUTIONS,
            "rounds": args.rounds,
            "profile": json_ready(PROFILE),
            "arms": {a: ARMS[a] for a in args.arm_names},
            "targets": list(TARGETS),
            "summary": summarise_runs([r for r in done if r["rounds"] == args.rounds]),
            "runs": done,
            "complete": not missing,
            "planned": len(plan),
            "missing": len(missing),
        },
    )


def run_plan(args: argparse.Namespace, runs: dict[str, dict], plan: list[tuple[str, int, int]]) -> None:
    """Every planned run not in ``runs`` yet, the file saved after each; data prepared only once one has to run."""
    with tempfile.TemporaryDirectory(prefix="fedseg_long_horizon_") as tmp:
        work = os.path.abspath(args.work or tmp)
        sites = pooled = None
        for number, (arm, seed, k) in enumerate(plan, 1):
            if run_key(arm, seed, k, args.rounds) in runs:
                continue
            if sites is None:
                sites = prepare(work)
                pooled = pooled_site(sites, os.path.join(work, "pooled"))
            print(f"[{number}/{len(plan)}] {arm} seed {seed} {participation_label(k)}", flush=True)
            result = run_arm(pooled if arm == CENTRALISED else sites, work, arm, seed, args.rounds, k)
            runs[run_key(arm, seed, k, args.rounds)] = result
            print(
                f"  final {result['final_dice_mean']:.3f} auc {result['auc']:.3f} ({result['wall_seconds']:.0f} s)",
                flush=True,
            )
            save(args, runs, plan)


def main() -> None:
    args = parse_args()
    runs = kept_runs(args)
    plan = planned_runs(args)
    run_plan(args, runs, plan)
    path = save(args, runs, plan)
    with open(path, encoding="utf-8") as f:
        print(markdown(json.load(f)["summary"]))
    print(f"written {path}")


if __name__ == "__main__":
    main()
