"""The run report: ``index.html`` (self-contained, plots inline), ``metrics.csv`` and ``summary.json``.

Numbers come only from the run's artifacts (``fedseg.app.artifacts``):
- learning curves: round r's record holds each site's validation of the global model it received at
  round r, i.e. the model after r aggregations (r = 0 is the initial model);
- final scores: cross-site evaluation of the final global model on each site's validation split (the
  model after the last round); without it, the last round's validation, and the report says so.
Overall scores weigh each site by its number of validation cases (a mean over all cases).
A run that continued a stopped one covers both parts: the curves start with the earlier run's rounds, and
the report says which rounds came from which job (``parts``).

This module computes the numbers (``build_summary``, ``curves``, ``pooled``) and writes the folder
(``write_report``); the page is ``fedseg.app.report_html``, the figure ``fedseg.app.plots``.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import time

from fedseg.app.artifacts import SERVER_MODEL_KEY, RunArtifacts
from fedseg.app.plots import Series, dice_curves_png
from fedseg.app.report_html import (  # noqa: F401  (the page's names, importable from here as before)
    DISCLAIMER,
    REGION_NAMES,
    Overlay,
    outcome_sentence,
    parts_note,
    reading,
    render_html,
    validation_note,
)
from fedseg.atomic import atomic_directory, write_json
from fedseg.metrics import DICE_KEYS, HD95_KEYS

SCORE_KEYS = DICE_KEYS + ("dice_mean",) + HD95_KEYS
CSV_COLUMNS = ("round", "site", "source") + SCORE_KEYS + ("n_cases", "train_loss")


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def pooled(site_scores: dict[str, dict]) -> dict:
    """Mean and sd of each score over all cases of all sites, exactly, from each site's (n, mean, sd).

    Sites without cases or without a score are left out of that score.
    """
    overall: dict = {}
    total_cases = 0
    for key in SCORE_KEYS:
        weighted, squares, weight, have_sd = 0.0, 0.0, 0.0, True
        for scores in site_scores.values():
            value, n = _number(scores.get(key)), _number(scores.get("n_cases")) or 0.0
            if value is not None and n > 0:
                sd = _number(scores.get(f"{key}_sd"))
                have_sd = have_sd and sd is not None
                weighted += value * n
                squares += n * ((sd or 0.0) ** 2 + value**2)
                weight += n
        mean = weighted / weight if weight else None
        overall[key] = mean
        overall[f"{key}_sd"] = math.sqrt(max(squares / weight - mean**2, 0.0)) if weight and have_sd else None
    for scores in site_scores.values():
        total_cases += int(_number(scores.get("n_cases")) or 0)
    overall["n_cases"] = total_cases
    return overall


def _pick(scores: dict) -> dict:
    out = {k: _number(scores.get(k)) for k in SCORE_KEYS}
    out.update({f"{k}_sd": _number(scores.get(f"{k}_sd")) for k in SCORE_KEYS})
    out["n_cases"] = int(_number(scores.get("n_cases")) or 0)
    return out


def final_scores(run: RunArtifacts) -> tuple[str, dict[str, dict]]:
    """(source, per-site scores) of the final global model."""
    if run.cross_site:
        sites = {
            site: _pick(models[SERVER_MODEL_KEY])
            for site, models in sorted(run.cross_site.items())
            if isinstance(models, dict) and SERVER_MODEL_KEY in models
        }
        if sites:
            return "cross_site_eval", sites
    last = run.rounds[-1]
    scored = {**last.get("validation_only", {}), **last.get("sites", {})}  # partial participation: every site
    return "last_round_validation", {site: _pick(m) for site, m in sorted(scored.items())}


def curves(run: RunArtifacts, final_source: str, final_sites: dict[str, dict]) -> list[dict]:
    """One row per (round, site) and per round for ``overall``; the final model is the last round + 1."""
    rows = []
    for record in run.rounds:
        # partial participation: the sites left out of a round validated the same global model
        scored = {**record.get("validation_only", {}), **record.get("sites", {})}
        sites = {site: _pick(m) for site, m in sorted(scored.items())}
        for site, scores in sites.items():
            rows.append(
                {
                    "round": record["round"],
                    "site": site,
                    "source": "round_validation",
                    **scores,
                    "train_loss": _number(scored[site].get("train_loss")),
                }
            )
        if sites:
            rows.append(
                {
                    "round": record["round"],
                    "site": "overall",
                    "source": "round_validation",
                    **pooled(sites),
                    "train_loss": None,
                }
            )
    if final_source == "cross_site_eval":
        final_round = run.rounds[-1]["round"] + 1
        for site, scores in final_sites.items():
            rows.append({"round": final_round, "site": site, "source": final_source, **scores, "train_loss": None})
        rows.append(
            {"round": final_round, "site": "overall", "source": final_source, **pooled(final_sites), "train_loss": None}
        )
    return rows


def communication_mb(run: RunArtifacts) -> list[float]:
    """Megabytes moved in each round: the global model to every answering site, and their updates back."""
    per_round = []
    for record in run.rounds:
        total = 0
        for site in record.get("sites", {}).values():
            total += (site.get("bytes_received_by_site") or 0) + (site.get("bytes_sent_by_site") or 0)
        per_round.append(total / 1e6)
    return per_round


def events(run: RunArtifacts) -> list[dict]:
    """Rounds where a site was missing or its update was rejected."""
    found = []
    for record in run.rounds:
        for site in record.get("missing", []):
            found.append({"round": record["round"], "site": site, "what": "no result (site missing)"})
        for site, reason in record.get("rejected", {}).items():
            found.append({"round": record["round"], "site": site, "what": f"update rejected: {reason}"})
        if record.get("global_updated") is False:
            found.append(
                {"round": record["round"], "site": "-", "what": "too few acceptable updates: global model kept"}
            )
    return found


def cross_site_matrix(run: RunArtifacts) -> dict[str, dict[str, float | None]]:
    """model -> site -> mean Dice: the global model on every site, and any local model a site chose to share.

    Our jobs ask for no local model (cross-site evaluation without ``submit_model``) and a hospital's site
    sends one only with ``share_local_model`` in its fedseg_site.json, so usually only the global row is here.
    """
    matrix: dict[str, dict[str, float | None]] = {}
    for site, models in sorted((run.cross_site or {}).items()):
        for model, scores in sorted(models.items()):
            if isinstance(scores, dict):
                matrix.setdefault(model, {})[site] = _number(scores.get("dice_mean"))
    return matrix


def validation_coverage(run: RunArtifacts) -> dict[str, dict]:
    """Per site: validation cases scored in each round (a fixed subset on large sites) and all it has."""
    coverage = {}
    for record in run.rounds:
        for site, metrics in record.get("sites", {}).items():
            if metrics.get("n_cases") is not None:
                scored = int(metrics["n_cases"])
                coverage[site] = {"per_round": scored, "of": int(metrics.get("n_val_cases_site") or scored)}
    return dict(sorted(coverage.items()))


def area_under_curve(curve: list[dict]) -> float | None:
    """Mean over rounds of the global model's mean Dice (rounds' validation only, not the final evaluation)."""
    values = [
        r["dice_mean"]
        for r in curve
        if r.get("source", "round_validation") == "round_validation" and r["dice_mean"] is not None
    ]
    return statistics.mean(values) if values else None


def last_rounds_mean(curve: list[dict], count: int = 3) -> float | None:
    values = [
        r["dice_mean"]
        for r in curve
        if r.get("source", "round_validation") == "round_validation" and r["dice_mean"] is not None
    ][-count:]
    return statistics.mean(values) if values else None


def run_parts(run: RunArtifacts) -> list[dict]:
    """Which job each stretch of rounds came from: the runs this one continued (``job``), then its own (None)."""
    parts: list[dict] = []
    for record in run.rounds:
        job = record.get("resumed_from")
        if parts and parts[-1]["job"] == job:
            parts[-1]["last_round"] = record["round"]
        else:
            parts.append({"job": job, "first_round": record["round"], "last_round": record["round"]})
    return parts


def participation(run: RunArtifacts) -> str:
    """How many sites trained per round, in words (from the run's settings)."""
    settings = run.run_info.get("settings", {})
    total = len(settings.get("sites") or run.sites or [])
    k = settings.get("clients_per_round") or 0
    if settings.get("selection_policy"):
        return f"the collaborator policy {settings['selection_policy']} over {total} sites"
    return f"all {total} sites every round" if not k or k >= total else f"{k} of {total} sites per round"


def job_outcome(run: RunArtifacts) -> dict:
    """How the job ended (``run.json``): FLARE's status, rounds done of planned, and why it stopped early."""
    info = run.run_info
    planned = info.get("planned_rounds") or info.get("settings", {}).get("num_rounds")
    done = len(run.rounds)
    completed = info.get("completed")
    if completed is None:  # a run.json from before the verdict was recorded: judge by the rounds
        completed = planned is not None and done >= planned
    return {
        "status": info.get("status") or "not recorded",
        "completed": bool(completed),
        "rounds_done": done,
        "rounds_planned": planned,
        "reason": info.get("reason"),
    }


def build_summary(run: RunArtifacts) -> dict:
    """The ``summary.json`` contract: algorithm, rounds, final overall and per-site Dice (+ what else we know)."""
    source, sites = final_scores(run)
    overall = pooled(sites)
    overall_rows = [row for row in curves(run, source, sites) if row["site"] == "overall"]
    info = run.run_info
    mb = communication_mb(run)
    training_cases = {}
    for record in run.rounds:
        for site, metrics in record.get("sites", {}).items():
            if metrics.get("n_train_cases") is not None:
                training_cases[site] = int(metrics["n_train_cases"])
    return {
        "job": job_outcome(run),
        "communication": {"mb_per_round": mb, "mb_total": sum(mb)},
        "events": events(run),
        "training_cases": training_cases,
        "validation": validation_coverage(run),
        "algorithm": run.algorithm,
        "rounds": len(run.rounds),
        "sites": run.sites,
        "participation": participation(run),
        "parts": run_parts(run),
        "auc": area_under_curve(overall_rows),
        "last3_dice_mean": last_rounds_mean(overall_rows),
        "final": {"source": source, "overall": overall, "sites": sites},
        "settings": info.get("settings", {}),
        "wall_seconds": info.get("wall_seconds"),
        "data_source": info.get("data_source"),
        "cross_site": cross_site_matrix(run),
        "challenge": _challenge(run),
        "global_model": run.global_model,
        "run_folder": run.folder,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _challenge(run: RunArtifacts) -> dict | None:
    from fedseg.app.challenge_score import convergence

    return convergence(run)


def learning_curve_png(rows: list[dict], sites: list[str]) -> bytes:
    """Dice per region over rounds: one panel per region, one line per site and the pooled overall."""
    series = [
        Series(
            site,
            [r for r in rows if r["site"] == site],
            dict(color="black", linewidth=2.2) if site == "overall" else dict(linewidth=1.2, alpha=0.8),
        )
        for site in sites + ["overall"]
    ]
    return dice_curves_png(series)


def write_metrics_csv(path: str, rows: list[dict]) -> None:
    """``metrics.csv``: one line per (round, site) of ``curves``, in ``CSV_COLUMNS``."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_report(run: RunArtifacts, out_dir: str, overlay: str | None = None, bundle: str | None = None) -> str:
    """Write the report folder atomically; returns the path of ``index.html``.

    ``overlay``: a PNG of a case segmented by the final model, copied beside the page and shown in it.
    ``bundle``: the folder of the run's MONAI bundle (``fedseg export-bundle``), linked from the page.
    """
    summary = build_summary(run)
    if bundle:
        summary["bundle"] = os.path.relpath(os.path.abspath(bundle), os.path.abspath(out_dir))
    rows = curves(run, summary["final"]["source"], summary["final"]["sites"])
    summary["curves"] = [r for r in rows if r["site"] == "overall"]
    plot = learning_curve_png(rows, summary["sites"])
    with atomic_directory(out_dir) as tmp:
        write_json(os.path.join(tmp, "summary.json"), summary)
        write_metrics_csv(os.path.join(tmp, "metrics.csv"), rows)
        with open(os.path.join(tmp, "learning_curves.png"), "wb") as f:
            f.write(plot)
        picture = None
        if overlay:
            with open(overlay, "rb") as f:
                picture = Overlay(os.path.basename(overlay), f.read())
            with open(os.path.join(tmp, picture.name), "wb") as f:
                f.write(picture.png)
        with open(os.path.join(tmp, "index.html"), "w", encoding="utf-8") as f:
            f.write(render_html(summary, plot, picture))
    return os.path.join(os.path.abspath(out_dir), "index.html")
