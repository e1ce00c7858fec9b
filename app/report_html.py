"""The run report's page: ``index.html`` from a run's summary (``fedseg.app.report.build_summary``), its
learning-curve figure and, optionally, a picture of a case segmented by the final model.

The page is one ``string.Template`` (``PAGE``) filled by one small function per section; every value put into
it is escaped here. The sentences on the numbers (``reading``, ``validation_note``, ...) are plain text.
"""

from __future__ import annotations

import base64
import html
import pathlib
import urllib.parse
from dataclasses import dataclass
from string import Template

from fedseg.app.artifacts import SERVER_MODEL_KEY
from fedseg.app.challenge_score import convergence_text
from fedseg.metrics import DICE_KEYS, HD95_KEYS

REGION_NAMES = {"tc": "tumour core", "wt": "whole tumour", "et": "enhancing tumour"}
DISCLAIMER = "FedRef-Seg is a research tool. Its segmentations and scores are not for diagnosis or treatment."
TABLE_HEADER = (
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

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>FedRef-Seg report: $algorithm</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.note { background: #fff4e0; border-left: 4px solid #e69a00; padding: 0.5em 1em; }
img { max-width: 100%; }
</style></head><body>
<h1>FedRef-Seg run report</h1>
<p class="note">$disclaimer</p>
<p class="$outcome_class"><b>$outcome</b></p>
<p>Algorithm <b>$algorithm</b>, $rounds rounds,
$participation, sites: $sites$wall.
Data: $data_source.$cases</p>
<h2>Final global model</h2>
<p>Scores of the final global model on each site's validation split
($final_source);
overall is the mean over all validation cases.</p>
<table><tr>$table_header</tr>$table_rows</table>
<h2>What the numbers say</h2><ul>$notes</ul>
<h2>Learning curves</h2>
<p>$validation_note</p>
$parts
<p>Area under the overall mean-Dice curve (mean over rounds): $auc; mean of the last
3 rounds: $last3.</p>
$challenge
<img alt="Dice per region over rounds" src="data:image/png;base64,$plot">
$cross_site
$communication
$events
$overlay$bundle<h2>Settings</h2><table>$settings</table>
<p>Generated $generated from $run_folder.</p>
</body></html>
""")


@dataclass
class Overlay:
    """A picture shown in the report: its file name (beside ``index.html``) and its PNG bytes."""

    name: str
    png: bytes


# -- sentences on the numbers ---------------------------------------------------------------------------------
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


# -- sections ---------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def _png(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _score_cell(scores: dict, key: str, digits: int) -> str:
    sd = scores.get(f"{key}_sd")
    return _fmt(scores.get(key), digits) + (f" &plusmn; {sd:.{digits}f}" if sd is not None else "")


def _score_row(name: str, scores: dict, strong: bool = False) -> str:
    cells = [html.escape(name), str(scores.get("n_cases", ""))]
    cells += [_score_cell(scores, k, 3) for k in DICE_KEYS + ("dice_mean",)]
    cells += [_score_cell(scores, k, 1) for k in HD95_KEYS]
    tag = "th" if strong else "td"
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def final_table_rows(final: dict) -> str:
    """The final model's row per site, then the pooled overall row."""
    rows = "".join(_score_row(site, s) for site, s in final["sites"].items())
    return rows + _score_row("overall", final["overall"], True)


def cross_site_section(summary: dict) -> str:
    """Mean Dice of every model on every site's data (empty without cross-site evaluation)."""
    matrix = summary.get("cross_site") or {}
    if not matrix:
        return ""
    sites = summary["sites"]
    return (
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


def communication_section(summary: dict) -> str:
    comm = summary.get("communication") or {}
    per_round = comm.get("mb_per_round") or []
    return (
        f"<h2>Communication</h2><p>{comm.get('mb_total', 0):.1f} MB moved in total, "
        f"{(sum(per_round) / len(per_round)) if per_round else 0:.2f} MB per round on average "
        "(the global model to every answering site and their updates back).</p>"
    )


def events_section(summary: dict) -> str:
    """Missing and rejected updates, one item per round and site (empty when there were none)."""
    items = "".join(
        f"<li>round {e['round']}: {html.escape(e['site'])}: {html.escape(e['what'])}</li>"
        for e in summary.get("events") or []
    )
    return f"<h2>Missing and rejected updates</h2><ul>{items}</ul>" if items else ""


def overlay_section(overlay: Overlay | None) -> str:
    if overlay is None:
        return ""
    return (
        f"<h2>A validation case segmented by the final model</h2><p>{html.escape(overlay.name)}: "
        "red necrotic core, green oedema, yellow enhancing tumour.</p>"
        f'<img alt="segmentation overlay" src="data:image/png;base64,{_png(overlay.png)}">'
    )


def bundle_section(summary: dict) -> str:
    """A link to the run's model as a MONAI bundle and to its model card (empty when none was exported)."""
    folder = summary.get("bundle")
    if not folder:
        return ""
    href = urllib.parse.quote(pathlib.PurePath(folder).as_posix())
    return (
        f'<h2>The model as a MONAI bundle</h2><p><a href="{href}/">{html.escape(folder)}</a>: the global model, '
        f'its inference pipeline and its <a href="{href}/docs/README.md">model card</a> (sites, rounds, '
        "scores, data, versions). MONAI runs it without FedRef-Seg: <code>python -m monai.bundle run "
        "--config_file configs/inference.json --dataset_dir &lt;case&gt; --output_dir &lt;out&gt;</code> in its "
        "folder.</p>"
    )


def _cases_text(summary: dict) -> str:
    """`` Cases: site-1 12 training / 3 validation, ...`` (empty when no training counts were recorded)."""
    counts = summary.get("training_cases") or {}
    sites = summary["final"]["sites"]
    text = ", ".join(
        f"{html.escape(s)} {counts[s]} training / {sites.get(s, {}).get('n_cases', '?')} validation"
        for s in sorted(counts)
    )
    return f" Cases: {text}." if text else ""


def render_html(summary: dict, plot_png: bytes, overlay: Overlay | None = None) -> str:
    """The report page; ``overlay`` adds its section just before the settings."""
    final, job = summary["final"], summary["job"]
    wall = summary.get("wall_seconds")
    parts = parts_note(summary.get("parts") or [])
    return PAGE.substitute(
        algorithm=html.escape(summary["algorithm"]),
        disclaimer=html.escape(DISCLAIMER),
        outcome_class="outcome" if job["completed"] else "note failed",
        outcome=html.escape(outcome_sentence(job)),
        rounds=summary["rounds"],
        participation=html.escape(summary.get("participation") or ""),
        sites=html.escape(", ".join(summary["sites"])),
        wall=f", wall time {wall:.0f} s" if wall else "",
        data_source=html.escape(str(summary.get("data_source") or "not recorded")),
        cases=_cases_text(summary),
        final_source="cross-site evaluation" if final["source"] == "cross_site_eval" else "last round's validation",
        table_header="".join(f"<th>{h}</th>" for h in TABLE_HEADER),
        table_rows=final_table_rows(final),
        notes="".join(f"<li>{html.escape(line)}</li>" for line in reading(summary)),
        validation_note=html.escape(validation_note(summary)),
        parts=f"<p>{html.escape(parts)}</p>" if parts else "",
        auc=_fmt(summary.get("auc")),
        last3=_fmt(summary.get("last3_dice_mean")),
        challenge=f"<p>{html.escape(convergence_text(summary.get('challenge')))}</p>"
        if summary.get("challenge")
        else "",
        plot=_png(plot_png),
        cross_site=cross_site_section(summary),
        communication=communication_section(summary),
        events=events_section(summary),
        overlay=overlay_section(overlay),
        bundle=bundle_section(summary),
        settings="".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
            for k, v in (summary.get("settings") or {}).items()
        ),
        generated=html.escape(summary["generated"]),
        run_folder=html.escape(summary["run_folder"]),
    )
