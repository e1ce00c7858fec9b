"""FedRef in the FeTS Challenge's Task 1 regime, against FedAvg, FedProx and FedPIDAvg (the 2022 winner).

The regime (``fedseg.fets_challenge``, docs/design.md): partitioning_2's 33 collaborators, as synthetic
FeTS-shaped sites with the CSV's relative sizes scaled so that a CPU finishes (``scaled_sizes``: every site at
least 1 training case, plus validation cases at the challenge's 80/20 split); each round the collaborators a
policy chooses train one epoch (``all``, or ``random:6``: six drawn from (seed, round), the same six for every
algorithm of a seed); every round is priced on the challenge's simulated clock with partitioning_2's real case
counts (seeded by the round: the same clock for every algorithm), and a run is scored by the challenge's
convergence score (the area under the best-so-far mean Dice over simulated time, projected to the week) next to
its final Dice and HD95 per region. A run goes to ``--rounds`` or until the week is spent, whichever comes first.

The plan, in the order it runs (each finished run is written to the result file at once; ``--resume`` keeps
the runs already there, so the plan spreads over sittings):
1. a p x lambda2 sweep of FedRef's trend prior, one seed, under ``random:6`` (``--sweep-seed``);
2. per seed: a centralised reference (every training case pooled in one site, one epoch a round: the optimiser
   steps of the ``all`` policy), then every arm under every policy; once the sweep is done, its best point
   (by convergence score) is one more arm, ``fedref_best``, confirmed on every seed.
Per policy and arm: means over seeds, and the paired differences to FedAvg and to FedPIDAvg with 95%
t-intervals on the convergence score, the final mean Dice and the rounds to the target.

    .venv/bin/python -m bench.fets_challenge --resume                                   # the whole plan
    .venv/bin/python -m bench.fets_challenge --seeds 0 --policies random:6 --resume     # one slice of it

Results: bench/results/fets_challenge.json (per run: arm, algorithm, seed, policy, convergence_score and the
per-round records with simulated_seconds and dice_mean, from which anyone can recompute the score).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from bench.common import institutions, json_ready, load_result, table, write_result
from bench.long_horizon import pooled_site
from bench.watched_run import complete_run
from fedseg import fets_challenge
from fedseg.app.compare import paired_interval

RESULT_NAME = "fets_challenge"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTITIONING_2 = os.path.join(REPO_ROOT, "tests", "data", "fets2022", "partitioning_2.csv")
TRAINING_CASES = 100  # partitioning_2's 1,251 subjects scaled to this many training cases (at least 1 a site)
SHAPE = (48, 48, 40)  # synthetic volumes: room for 32^3 crops, cheap sliding-window validation
CENTRALISED = "centralised"
SERVER_MOMENTUM = 0.5  # fedref_momentum's and fedavgm's: the two arms differ by FedRef's prior alone
ARMS = {  # arm: JobSettings overrides (FedRef's lambdas as bench.long_horizon found them)
    "fedavg": {"algorithm": "fedavg"},
    "fedprox": {"algorithm": "fedprox"},
    "fedpidavg": {"algorithm": "fedpidavg"},
    "fedavgm": {"algorithm": "fedavgm", "server_momentum": SERVER_MOMENTUM},
    "fedref_trend": {"algorithm": "fedref", "fedref_variant": "trend", "lambda1": 0.0, "lambda2": 0.3},
    "fedref_mean": {"algorithm": "fedref", "fedref_variant": "mean", "lambda1": 0.1, "lambda2": 0.1},
    "fedref_momentum": {
        "algorithm": "fedref",
        "fedref_variant": "trend",
        "fedref_momentum": SERVER_MOMENTUM,
        "lambda1": 0.0,
        "lambda2": 0.3,
    },
}
SWEEP_P = (2, 3, 5)
SWEEP_LAMBDA2 = (0.1, 0.3, 1.0)
SWEEP_POLICY = "random:6"
BASELINES = ("fedavg", "fedpidavg", "fedavgm")  # fedavgm: fedref_momentum's server momentum without the prior
PROFILE = {  # bench.long_horizon's cheap network; one epoch a round, as the challenge's default
    "channels": (8, 16, 32),
    "crop": (32, 32, 32),
    "local_steps": 0,
    "local_epochs": 1,
    "batch_size": 2,
    "samples_per_case": 2,
    "val_max_cases": 0,  # every case: a site refuses 1 to 7 (a round's Dice never describes one chosen patient)
    "sw_batch_size": 4,
    "lr": 3e-3,
}
TARGET = 0.6  # mean Dice
WAIT_FOR_LATE_SITE = 240  # seconds a round waits for the last site after the first answered (then: missing)


def sweep_arms() -> dict[str, dict]:
    return {
        f"fedref_p{p}_l{lam}": {**ARMS["fedref_trend"], "buffer_size": p, "lambda2": lam}
        for p in SWEEP_P
        for lam in SWEEP_LAMBDA2
    }


def site_rows() -> list[tuple]:
    """One synthetic institution per partition (in partition order: site-<partition>): its subjects and looks.

    Subjects: the scaled training cases plus validation at the 80/20 split (at least one). Scanner differences
    (intensity scale, bias, noise, tumour size) are drawn per partition from a fixed seed: the same every time.
    """
    sizes = fets_challenge.partition_sizes(PARTITIONING_2)
    scaled = fets_challenge.scaled_sizes(sizes, TRAINING_CASES)
    rng = random.Random("fets_challenge_sites")
    rows = []
    for partition in sorted(sizes):
        train = scaled[partition]
        low = rng.uniform(14, 26)
        rows.append(
            (
                train + max(1, round(train / 4)),
                round(400 * 6.25 ** rng.random(), 1),  # 400 to 2500, log-uniform
                round(rng.uniform(0.05, 0.3), 3),
                round(rng.uniform(0.02, 0.06), 3),
                (round(low, 1), round(low + 12, 1)),
            )
        )
    return rows


def prepare(work: str) -> str:
    """The 33 sites, site-1 .. site-33 (the same every time: a resumed plan matches)."""
    from fedseg.data_prep.fets2022 import prepare_sites
    from fedseg.data_prep.synthetic import SyntheticConfig, generate

    config = SyntheticConfig(shape=SHAPE, institutions=institutions(site_rows()))
    source = generate(os.path.join(work, "data"), config)
    prepare_sites(source, os.path.join(work, "sites"), validation_fraction=0.2)
    return os.path.join(work, "sites")


def sites() -> list[str]:
    return [f"site-{p}" for p in sorted(fets_challenge.partition_sizes(PARTITIONING_2))]


def job_for(data_root: str, arm: str, overrides: dict, seed: int, policy: str, rounds: int):
    from fedseg.jobs.recipes import JobSettings

    common = dict(data_root=data_root, threads=1, seed=seed, num_rounds=rounds, cross_site_eval=False)
    if arm == CENTRALISED:
        return JobSettings(sites=["site-1"], algorithm="fedavg", name=f"centralised_s{seed}", **common, **PROFILE)
    return JobSettings(
        sites=sites(),
        min_clients=1,
        wait_after_min_seconds=WAIT_FOR_LATE_SITE,
        selection_policy=policy,
        challenge_clock=PARTITIONING_2,
        name=f"{arm}_{policy.replace(':', '')}_s{seed}",
        **common,
        **{**PROFILE, **overrides},
    )


def run_arm(data_root: str, work: str, arm: str, overrides: dict, seed: int, policy: str, rounds: int) -> dict:
    """One run and what the result file keeps of it."""
    from fedseg.app.compare import summarise

    started = time.time()
    job = job_for(data_root, arm, overrides, seed, policy, rounds)
    run = complete_run(job, os.path.join(work, "runs"))
    summary = summarise(run, target=TARGET)
    final = summary["final"]["overall"]
    challenge = summary["challenge"] or {}
    curve = [row["dice_mean"] for row in summary["curve"] if row["source"] == "round_validation"]
    per_round = challenge.get("per_round") or [
        {"round": n, "simulated_seconds": None, "dice_mean": d, "participants": ["site-1"]} for n, d in enumerate(curve)
    ]
    return {
        "arm": arm,
        "algorithm": job.algorithm if arm != CENTRALISED else CENTRALISED,
        "seed": seed,
        "policy": policy,
        "rounds": len(run.rounds),
        "planned_rounds": rounds,
        "convergence_score": challenge.get("convergence_score"),
        "simulated_hours": challenge.get("simulated_hours"),
        "budget_spent": challenge.get("budget_spent"),
        "rounds_to_target": summary["rounds_to_target"],
        **{f"final_{key}": final.get(key) for key in ("dice_mean", "dice_tc", "dice_wt", "dice_et")},
        **{f"final_{key}": final.get(key) for key in ("hd95_tc", "hd95_wt", "hd95_et")},
        "per_round": per_round,
        "settings": json_ready({**PROFILE, **overrides}),
        "wall_seconds": time.time() - started,
    }


PAIRED = ("convergence_score", "final_dice_mean", "rounds_to_target")


def summarise_runs(runs: list[dict]) -> list[dict]:
    """Per (policy, arm): means over seeds, and paired differences to each baseline (same seed, same policy)."""
    out = []
    for policy in sorted({r["policy"] for r in runs if r["arm"] != CENTRALISED}):
        in_policy = [r for r in runs if r["policy"] == policy]
        by_arm: dict[str, dict[int, dict]] = {}
        for r in in_policy:
            by_arm.setdefault(r["arm"], {})[r["seed"]] = r
        for arm, seeds in by_arm.items():
            row = {"policy": policy, "arm": arm, "seeds": sorted(seeds)}
            for key in (*PAIRED, "simulated_hours", "final_hd95_tc", "final_hd95_wt", "final_hd95_et"):
                values = [s[key] for s in seeds.values() if s.get(key) is not None]
                row[key] = statistics.mean(values) if values else None
            for baseline in BASELINES:
                if baseline == arm or baseline not in by_arm:
                    continue
                for key in PAIRED:
                    diffs = [
                        s[key] - by_arm[baseline][seed][key]
                        for seed, s in seeds.items()
                        if seed in by_arm[baseline]
                        and s.get(key) is not None
                        and by_arm[baseline][seed].get(key) is not None
                    ]
                    row[f"{key}_minus_{baseline}"] = paired_interval(diffs) if diffs else None
            out.append(row)
    return out


def best_sweep_point(runs: dict[str, dict]) -> tuple[str, dict] | None:
    """The sweep's arm with the highest convergence score, once every sweep point has run (else None)."""
    points = {arm: r for r in runs.values() for arm in [r["arm"]] if arm in sweep_arms()}
    if len(points) < len(sweep_arms()):
        return None
    arm = max(points, key=lambda a: points[a]["convergence_score"] or -1)
    return arm, sweep_arms()[arm]


def same_arm(overrides: dict) -> str | None:
    """The arm of ARMS that runs these settings (FedRef's p filled in with its default), if any."""
    from fedseg.fedref import DEFAULT_BUFFER_SIZE

    def filled(o: dict) -> dict:
        return {**o, "buffer_size": o.get("buffer_size", DEFAULT_BUFFER_SIZE)} if o["algorithm"] == "fedref" else o

    return next((arm for arm, o in ARMS.items() if filled(o) == filled(overrides)), None)


def run_key(arm: str, seed: int, policy: str, rounds: int) -> str:
    return f"{arm}|{policy}|s{seed}|r{rounds}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--policies", nargs="+", default=["all", "random:6"])
    parser.add_argument("--rounds", type=int, default=30, help="at most this many rounds (or until the week)")
    parser.add_argument("--sweep-seed", type=int, default=0)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-centralised", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the result file")
    parser.add_argument("--work", help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args()
    for policy in args.policies:
        fets_challenge.parse_policy(policy)
    return args


def planned_runs(args: argparse.Namespace, runs: dict[str, dict]) -> list[tuple[str, dict, int, str]]:
    """(arm, overrides, seed, policy) in the order they run; ``fedref_best`` once the sweep has a best point."""
    plan = [] if args.no_sweep else [(a, o, args.sweep_seed, SWEEP_POLICY) for a, o in sweep_arms().items()]
    best = best_sweep_point(runs)
    arms = [(a, ARMS[a]) for a in args.arms]
    if best and not same_arm(best[1]):  # the best point is an arm of its own unless an arm already runs it
        arms.append(("fedref_best", best[1]))
    for seed in args.seeds:
        plan += [] if args.no_centralised else [(CENTRALISED, {}, seed, "all")]
        plan += [(arm, overrides, seed, policy) for policy in args.policies for arm, overrides in arms]
    return plan


def save(args: argparse.Namespace, runs: dict[str, dict], plan: list) -> str:
    done = sorted(runs.values(), key=lambda r: (r["policy"], r["seed"], r["arm"]))
    missing = [item for item in plan if run_key(item[0], item[2], item[3], args.rounds) not in runs]
    best = best_sweep_point(runs)
    return write_result(
        RESULT_NAME,
        {
            "partitioning": "partitioning_2.csv (33 collaborators)",
            "training_cases": TRAINING_CASES,
            "site_rows": site_rows(),
            "shape": SHAPE,
            "rounds": args.rounds,
            "profile": json_ready(PROFILE),
            "arms": ARMS,
            "sweep": {
                "p": SWEEP_P,
                "lambda2": SWEEP_LAMBDA2,
                "policy": SWEEP_POLICY,
                "best": best,
                "best_is_arm": same_arm(best[1]) if best else None,
            },
            "target": TARGET,
            "clock": "fedseg.fets_challenge (FeTS-AI/Challenge Task_1 experiment.py, 1c12265): partitioning_2's "
            "real case counts, one epoch a round, the week budget",
            "summary": summarise_runs([r for r in done if r["planned_rounds"] == args.rounds]),
            "runs": done,
            "complete": not missing,
            "planned": len(plan),
            "missing": len(missing),
        },
    )


def run_plan(args: argparse.Namespace, runs: dict[str, dict]) -> list:
    """Every planned run not done yet, the file saved after each; the data prepared once one has to run."""
    with tempfile.TemporaryDirectory(prefix="fedseg_fets_challenge_") as tmp:
        work = os.path.abspath(args.work or tmp)
        data = pooled = None
        number = 0
        while True:
            plan = planned_runs(args, runs)  # the sweep's best point joins once the sweep is done
            todo = [item for item in plan if run_key(item[0], item[2], item[3], args.rounds) not in runs]
            if not todo:
                return plan
            arm, overrides, seed, policy = todo[0]
            if data is None:
                data = prepare(work)
                pooled = pooled_site(data, os.path.join(work, "pooled"))
            number += 1
            print(f"[{number}, {len(todo) - 1} after it] {arm} seed {seed} {policy}", flush=True)
            result = run_arm(pooled if arm == CENTRALISED else data, work, arm, overrides, seed, policy, args.rounds)
            runs[run_key(arm, seed, policy, args.rounds)] = result
            score = result["convergence_score"]
            print(
                f"  score {'-' if score is None else f'{score:.3f}'} final {result['final_dice_mean']:.3f} "
                f"{result['rounds']} rounds ({result['wall_seconds']:.0f} s)",
                flush=True,
            )
            save(args, runs, plan)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        if value["low"] is None:
            return f"{value['mean']:+.{digits}f} (n=1)"
        return f"{value['mean']:+.{digits}f} [{value['low']:+.{digits}f}, {value['high']:+.{digits}f}]"
    return f"{value:.{digits}f}"


def markdown(summary: list[dict]) -> str:
    headers = ["policy", "arm", "seeds", "score", "final Dice", "rounds to target", "sim. h"]
    headers += ["score - FedAvg", "Dice - FedAvg", "score - FedPIDAvg", "Dice - FedPIDAvg"]
    rows = [
        [
            r["policy"],
            r["arm"],
            len(r["seeds"]),
            _fmt(r["convergence_score"]),
            _fmt(r["final_dice_mean"]),
            _fmt(r["rounds_to_target"], 1),
            _fmt(r["simulated_hours"], 0),
            *(_fmt(r.get(f"{key}_minus_{b}")) for b in BASELINES for key in ("convergence_score", "final_dice_mean")),
        ]
        for r in summary
    ]
    return table(headers, rows)


def main() -> None:
    args = parse_args()
    old = load_result(RESULT_NAME) if args.resume else {}
    runs = {run_key(r["arm"], r["seed"], r["policy"], r["planned_rounds"]): r for r in old.get("runs", [])}
    plan = run_plan(args, runs)
    path = save(args, runs, plan)
    print(markdown(summarise_runs([r for r in runs.values() if r["planned_rounds"] == args.rounds])))
    print(f"written {path}")


if __name__ == "__main__":
    main()
