"""The run report: ``index.html`` (self-contained, plots inline), ``metrics.csv`` and ``summary.json``.

Numbers come only from the run's artifacts (``fedseg.app.artifacts``):
- learning curves: round r's record holds each site's validation of the global model it received at
  round r, i.e. the model after r aggregations (r = 0 is the initial model);
- final scores: cross-site evaluation of the final global model on each site's validation split (the
  model after the last round); without it, the last round's validation, and the report says so.
Overall scores weigh each site by its number of validation cases (a mean over all cases).
A run that continued a stopped one covers both parts: the curves start with the earlier run's rounds, and
the report says which rounds came from which job (``parts``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import statistics
import time

from fedseg.app.artifacts import SERVER_MODEL_KEY, RunArtifacts
from fedseg.atomic import atomic_directory, write_json
from fedseg.metrics import DICE_KEYS, HD95_KEYS

SCORE_KEYS = DICE_KEYS + ("dice_mean",) + HD95_KEYS
REGION_NAMES = {"tc": "tumour core", "wt": "whole tumour", "et": "enhancing tumour"}
CSV_COLUMNS = ("round", "site", "source") + SCORE_KEYS + ("n_cases", "train_loss")
DISCLAIMER = "FedRef-Seg is a research tool. Its segmentations and scores are not for diagnosis or treatment."


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


def validation_note(summary: dict) -> str:
    """Which numbers come from which validation: the per-round subset (curves) or every case (final table)."""
    subset = {s: c for s, c in (summary.get("validation") or {}).items() if c["per_round"] < c["of"]}
    curves = "Learning curves: each site's validation of the global model it received, on " + (
        "every validation case"
        if not subset
        else "a fixed, seeded subset of its validation cases ("
        + ", ".join(f"{s}: {c['per_round']} of {c['of']}" for s, c in subset.items())
        + "), the same every round"
    )
    if summary["final"]["source"] == "cross_site_eval":
        final = "final table: every validation case of every site (cross-site evaluation)."
    else:
        final = "final table: the last round's validation" + (", on that subset." if subset else ".")
    return f"{curves}; {final}"


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


def parts_note(parts: list[dict]) -> str:
    """One sentence for a continued run, e.g. "Rounds 0-1 from job 3f2c, continued as this job from round 2."
    (empty for a run in one part)."""
    if len(parts) < 2:
        return ""

    def span(part: dict) -> str:
        first, last = part["first_round"], part["last_round"]
        return f"round {first}" if first == last else f"rounds {first}-{last}"

    earlier = ", ".join(f"{span(p)} from job {p['job']}" for p in parts if p["job"] is not None)
    own = [p for p in parts if p["job"] is None]
    sentence = earlier + (f", continued as this job from round {own[0]['first_round']}" if own else "")
    return sentence[0].upper() + sentence[1:] + "."


def participation(run: RunArtifacts) -> str:
    """How many sites trained per round, in words (from the run's settings)."""
    settings = run.run_info.get("settings", {})
    total = len(settings.get("sites") or run.sites or [])
    k = settings.get("clients_per_round") or 0
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


def outcome_sentence(job: dict) -> str:
    """One line a reader sees first: did the run finish, and if not, how far it got and why."""
    rounds = f"{job['rounds_done']} of {job['rounds_planned'] or '?'} rounds"
    if job["completed"]:
        return f"Job status {job['status']}: completed, {rounds}."
    return (
        f"Job status {job['status']}: NOT completed, {rounds}"
        + (f"; reason: {job['reason']}" if job.get("reason") else "")
        + ". The scores below are from the rounds that ran."
    )


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
        "global_model": run.global_model,
        "run_folder": run.folder,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def learning_curve_png(rows: list[dict], sites: list[str]) -> bytes:
    """Dice per region over rounds: one panel per region, one line per site and the pooled overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("dice_tc", "TC"), ("dice_wt", "WT"), ("dice_et", "ET"), ("dice_mean", "mean")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for site in sites + ["overall"]:
            points = [(r["round"], r[key]) for r in rows if r["site"] == site and r[key] is not None]
            if not points:
                continue
            x, y = zip(*points)
            style = dict(color="black", linewidth=2.2) if site == "overall" else dict(linewidth=1.2, alpha=0.8)
            ax.plot(x, y, marker="o", markersize=3, label=site, **style)
        ax.set_title(f"Dice {title}")
        ax.set_xlabel("aggregation rounds")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice of the global model")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def reading(summary: dict) -> list[str]:
    """A few plain sentences on the numbers: weakest region, lagging site."""
    overall, sites = summary["final"]["overall"], summary["final"]["sites"]
    lines = []
    regions = [(overall.get(f"dice_{r}"), r) for r in ("tc", "wt", "et") if overall.get(f"dice_{r}") is not None]
    if regions:
        low, region = min(regions)
        lines.append(f"The weakest region is the {REGION_NAMES[region]} ({region.upper()}), mean Dice {low:.3f}.")
    ranked = sorted((s["dice_mean"], name) for name, s in sites.items() if s.get("dice_mean") is not None)
    if len(ranked) > 1:
        (low, site), (high, best) = ranked[0], ranked[-1]
        lines.append(f"{site} lags with mean Dice {low:.3f}; {best} leads with {high:.3f}.")
    if summary["final"]["source"] != "cross_site_eval":
        lines.append("Final scores are the last round's validation (no cross-site evaluation was run).")
    return lines


def _fmt(value, digits: int = 3) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def render_html(summary: dict, plot_png: bytes) -> str:
    final = summary["final"]
    header = "".join(
        f"<th>{h}</th>"
        for h in (
            "site",
            "cases",
            "Dice TC",
            "Dice WT",
            "Dice ET",
            "Dice mean",
            "HD95 TC (mm)",
            "HD95 WT (mm)",
            "HD95 ET (mm)",
        )
    )

    def cell(s: dict, key: str, digits: int) -> str:
        sd = s.get(f"{key}_sd")
        return _fmt(s.get(key), digits) + (f" &plusmn; {sd:.{digits}f}" if sd is not None else "")

    def row(name: str, s: dict, strong: bool = False) -> str:
        cells = [html.escape(name), str(s.get("n_cases", ""))]
        cells += [cell(s, k, 3) for k in DICE_KEYS + ("dice_mean",)] + [cell(s, k, 1) for k in HD95_KEYS]
        tag = "th" if strong else "td"
        return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"

    rows = "".join(row(site, s) for site, s in final["sites"].items()) + row("overall", final["overall"], True)
    matrix = summary.get("cross_site") or {}
    cross = ""
    if matrix:
        sites = summary["sites"]
        cross = (
            "<h2>Cross-site validation (mean Dice)</h2>"
            + (
                "<p>Sites' local models: not shared (only the global model is scored on every site).</p>"
                if all(model == SERVER_MODEL_KEY for model in matrix)
                else ""
            )
            + "<table><tr><th>model \\ data of</th>"
            + "".join(f"<th>{html.escape(s)}</th>" for s in sites)
            + "</tr>"
            + "".join(
                f"<tr><td>{html.escape(model)}</td>" + "".join(f"<td>{_fmt(v.get(s))}</td>" for s in sites) + "</tr>"
                for model, v in matrix.items()
            )
            + "</table>"
        )
    settings = summary.get("settings") or {}
    settings_rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items()
    )
    wall = summary.get("wall_seconds")
    comm = summary.get("communication") or {}
    per_round = comm.get("mb_per_round") or []
    comm_text = (
        f"<h2>Communication</h2><p>{comm.get('mb_total', 0):.1f} MB moved in total, "
        f"{(sum(per_round) / len(per_round)) if per_round else 0:.2f} MB per round on average "
        "(the global model to every answering site and their updates back).</p>"
    )
    event_rows = "".join(
        f"<li>round {e['round']}: {html.escape(e['site'])}: {html.escape(e['what'])}</li>"
        for e in summary.get("events") or []
    )
    event_text = f"<h2>Missing and rejected updates</h2><ul>{event_rows}</ul>" if event_rows else ""
    counts = summary.get("training_cases") or {}
    case_text = ", ".join(
        f"{html.escape(s)} {counts[s]} training / {final['sites'].get(s, {}).get('n_cases', '?')} validation"
        for s in sorted(counts)
    )
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in reading(summary))
    parts = parts_note(summary.get("parts") or [])
    parts_text = f"<p>{html.escape(parts)}</p>" if parts else ""
    image = base64.b64encode(plot_png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>FedRef-Seg report: {html.escape(summary["algorithm"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.note {{ background: #fff4e0; border-left: 4px solid #e69a00; padding: 0.5em 1em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>FedRef-Seg run report</h1>
<p class="note">{html.escape(DISCLAIMER)}</p>
<p class="{"outcome" if summary["job"]["completed"] else "note failed"}"><b>{html.escape(outcome_sentence(summary["job"]))}</b></p>
<p>Algorithm <b>{html.escape(summary["algorithm"])}</b>, {summary["rounds"]} rounds,
{html.escape(summary.get("participation") or "")}, sites: {html.escape(", ".join(summary["sites"]))}{f", wall time {wall:.0f} s" if wall else ""}.
Data: {html.escape(str(summary.get("data_source") or "not recorded"))}.{f" Cases: {case_text}." if case_text else ""}</p>
<h2>Final global model</h2>
<p>Scores of the final global model on each site's validation split
({"cross-site evaluation" if final["source"] == "cross_site_eval" else "last round's validation"});
overall is the mean over all validation cases.</p>
<table><tr>{header}</tr>{rows}</table>
<h2>What the numbers say</h2><ul>{notes}</ul>
<h2>Learning curves</h2>
<p>{html.escape(validation_note(summary))}</p>
{parts_text}
<p>Area under the overall mean-Dice curve (mean over rounds): {_fmt(summary.get("auc"))}; mean of the last
3 rounds: {_fmt(summary.get("last3_dice_mean"))}.</p>
<img alt="Dice per region over rounds" src="data:image/png;base64,{image}">
{cross}
{comm_text}
{event_text}
<h2>Settings</h2><table>{settings_rows}</table>
<p>Generated {html.escape(summary["generated"])} from {html.escape(summary["run_folder"])}.</p>
</body></html>
"""


def write_report(run: RunArtifacts, out_dir: str, overlay: str | None = None) -> str:
    """Write the report folder atomically; returns the path of ``index.html``.

    ``overlay``: a PNG of a case segmented by the final model, shown in the report.
    """
    summary = build_summary(run)
    rows = curves(run, summary["final"]["source"], summary["final"]["sites"])
    summary["curves"] = [r for r in rows if r["site"] == "overall"]
    plot = learning_curve_png(rows, summary["sites"])
    with atomic_directory(out_dir) as tmp:
        write_json(os.path.join(tmp, "summary.json"), summary)
        with open(os.path.join(tmp, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        with open(os.path.join(tmp, "learning_curves.png"), "wb") as f:
            f.write(plot)
        extra = ""
        if overlay:
            with open(overlay, "rb") as f:
                picture = f.read()
            with open(os.path.join(tmp, os.path.basename(overlay)), "wb") as f:
                f.write(picture)
            extra = (
                f"<h2>A validation case segmented by the final model</h2><p>{html.escape(os.path.basename(overlay))}: "
                "red necrotic core, green oedema, yellow enhancing tumour.</p>"
                f'<img alt="segmentation overlay" src="data:image/png;base64,{base64.b64encode(picture).decode()}">'
            )
        with open(os.path.join(tmp, "index.html"), "w", encoding="utf-8") as f:
            f.write(render_html(summary, plot).replace("<h2>Settings</h2>", extra + "<h2>Settings</h2>"))
    return os.path.join(os.path.abspath(out_dir), "index.html")
