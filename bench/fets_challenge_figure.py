"""The picture of bench.fets_challenge's runs: best-so-far mean Dice over simulated hours, one line per arm.

The convergence score is the area under exactly such a line (projected to the week), so the figure shows where
one arm's score comes from: how early it climbs, not only where it ends. One panel per selection policy; each
line is the mean over the seeds every arm of that policy ran (paired seeds: the same sites, the same chosen
collaborators and the same clock), drawn against the round's mean simulated time, which is the same for every
arm of a seed. The centralised reference has no clock (one site, no network): a dashed line at its mean final
Dice over the same seeds.

    .venv/bin/python -m bench.fets_challenge_figure      # reads bench/results/fets_challenge.json

Writes docs/fets_challenge_curves.png (atomically).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics

from bench.common import load_result
from bench.fets_challenge import ARMS, CENTRALISED, REPO_ROOT, RESULT_NAME
from fedseg.atomic import atomic_path

DEFAULT_OUT = os.path.join(REPO_ROOT, "docs", "fets_challenge_curves.png")


def best_so_far(per_round: list[dict]) -> list[float]:
    """The best mean Dice up to and including each round (0 before any round has a Dice)."""
    best, out = 0.0, []
    for row in per_round:
        if row["dice_mean"] is not None:
            best = max(best, row["dice_mean"])
        out.append(best)
    return out


def paired_seeds(runs: list[dict], policy: str) -> list[int]:
    """The seeds on which every arm of ``policy`` that ran at all has run: the figure's lines stay paired."""
    by_arm: dict[str, set[int]] = {}
    for r in runs:
        if r["policy"] == policy and r["arm"] in ARMS:
            by_arm.setdefault(r["arm"], set()).add(r["seed"])
    return sorted(set.intersection(*by_arm.values())) if by_arm else []


def mean_curves(runs: list[dict], policy: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per arm of ``policy``: (mean cumulative simulated hours at each round's end, mean best-so-far Dice)."""
    seeds = paired_seeds(runs, policy)
    curves = {}
    for arm in ARMS:
        chosen = [r for r in runs if r["policy"] == policy and r["arm"] == arm and r["seed"] in seeds]
        if not chosen:
            continue
        length = min(len(r["per_round"]) for r in chosen)  # a run stops early only when the week is spent
        hours = [[0.0] for _ in chosen]
        for h, r in zip(hours, chosen):
            for row in r["per_round"][:length]:
                h.append(h[-1] + row["simulated_seconds"] / 3600)
        best = [[0.0, *best_so_far(r["per_round"][:length])] for r in chosen]
        curves[arm] = ([statistics.mean(c) for c in zip(*hours)], [statistics.mean(c) for c in zip(*best)])
    return curves


def centralised_final(runs: list[dict]) -> float | None:
    """The centralised reference's mean final Dice over the seeds the ``all`` panel draws."""
    seeds = paired_seeds(runs, "all")
    finals = [r["final_dice_mean"] for r in runs if r["arm"] == CENTRALISED and r["seed"] in seeds]
    return statistics.mean(finals) if finals else None


def figure_png(runs: list[dict]) -> bytes:
    """A PNG with one panel per policy of ``runs`` (the runs of bench/results/fets_challenge.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({r["policy"] for r in runs if r["arm"] in ARMS})
    fig, axes = plt.subplots(1, len(policies), figsize=(6.5 * len(policies), 4.2), sharey=True, squeeze=False)
    reference = centralised_final(runs)
    for ax, policy in zip(axes[0], policies):
        for arm, (hours, best) in mean_curves(runs, policy).items():
            ax.step(hours, best, where="post", label=arm, linewidth=2.0 if arm.startswith("fedref") else 1.2)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="centralised (final Dice)")
        ax.set_title(f"{policy}: mean of seeds {', '.join(map(str, paired_seeds(runs, policy)))}")
        ax.set_xlabel("simulated hours (FeTS Challenge clock; the week is 168 h)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("best mean Dice so far")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="the PNG to write (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=30, help="the plan's rounds whose runs to draw")
    args = parser.parse_args()
    result = load_result(RESULT_NAME)
    runs = [r for r in result.get("runs", []) if r["planned_rounds"] == args.rounds]
    if not any(r["arm"] in ARMS for r in runs):
        raise SystemExit(f"no {args.rounds}-round runs in bench/results/{RESULT_NAME}.json: run bench.fets_challenge")
    with atomic_path(args.out) as tmp, open(tmp, "wb") as f:
        f.write(figure_png(runs))
    print(f"written {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
