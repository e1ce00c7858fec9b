"""A run's FeTS Challenge score, from its round records: simulated time and the convergence score.

Why from the records and not from the server: the score needs each round's pooled Dice of the global model,
which the report computes anyway (``fedseg.app.report.curves``), and the server's records carry each round's
simulated seconds (``fedseg.challenge_rounds``). Anyone holding ``round_metrics.jsonl`` can recompute it.

The Dice of round r is the global model the sites received at round r, pooled over every site's validation
cases (sites left out of the round validate it too), as the challenge scored the aggregated model's validation
at the start of each round; the final model after the last round is not scored (nor was it in the challenge).
"""

from __future__ import annotations

from fedseg.app.artifacts import RunArtifacts
from fedseg.fets_challenge import WEEK_SECONDS, ConvergenceScore


def clock_rounds(run: RunArtifacts) -> list[dict]:
    """Per round: its number, simulated seconds and pooled mean Dice; [] when the run had no clock."""
    if not run.rounds or any(r.get("simulated_seconds") is None for r in run.rounds):
        return []
    from fedseg.app.report import curves, final_scores  # the report shows this module's line

    source, sites = final_scores(run)
    dice = {
        row["round"]: row["dice_mean"]
        for row in curves(run, source, sites)
        if row["site"] == "overall" and row["source"] == "round_validation"
    }
    return [
        {
            "round": record["round"],
            "simulated_seconds": record["simulated_seconds"],
            "dice_mean": dice.get(record["round"]),
            "participants": record.get("participants", []),
        }
        for record in run.rounds
    ]


def convergence(run: RunArtifacts) -> dict | None:
    """The run on the challenge's clock (None without one): score, simulated hours, rounds, best Dice, per round.

    The score is ``fedseg.fets_challenge.ConvergenceScore`` over the rounds, projected to the run's time budget
    (the challenge's week unless the job set another). A round without a Dice (no site answered) counts its time
    at the best Dice so far, as in the challenge.
    """
    rounds = clock_rounds(run)
    if not rounds:
        return None
    settings = run.run_info.get("settings", {})
    score = ConvergenceScore(week=settings.get("time_budget_seconds") or WEEK_SECONDS)
    for row in rounds:
        if score.spent:
            break
        score.add_round(float("nan") if row["dice_mean"] is None else row["dice_mean"], row["simulated_seconds"])
    return {
        "convergence_score": score.projected,
        "simulated_hours": score.total_seconds / 3600,
        "rounds": score.rounds,
        "best_dice_mean": score.best if score.best >= 0 else None,
        "budget_hours": score.week / 3600,
        "budget_spent": score.spent,
        "policy": settings.get("selection_policy") or policy_of(settings),
        "per_round": rounds,
    }


def policy_of(settings: dict) -> str:
    """The selection policy a run without an explicit one used: every site, or k drawn at random."""
    k = settings.get("clients_per_round") or 0
    return f"random:{k}" if k else "all"


def convergence_text(challenge: dict | None) -> str:
    """One line for the report and the comparison; empty without the clock."""
    if not challenge:
        return ""
    spent = ", the time budget spent" if challenge["budget_spent"] else ""
    return (
        f"FeTS Challenge clock ({challenge['policy']}): {challenge['simulated_hours']:.1f} simulated hours over "
        f"{challenge['rounds']} rounds{spent}; convergence score {challenge['convergence_score']:.3f} "
        f"(best-so-far mean Dice over simulated time, projected to {challenge['budget_hours']:.0f} h)"
    )
