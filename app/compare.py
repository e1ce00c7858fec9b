"""Compare algorithms run on the same data, seeds, network and rounds: who wins on which measure.

Measures, all from the runs' artifacts:
- Dice per region over rounds (pooled over all validation cases), final Dice overall and per site;
- rounds to reach a target mean Dice (first round whose global model reaches it; None if never);
- area under the Dice curve: the mean over rounds of the global model's mean Dice (speed and level in one
  number), and the mean of the last three rounds (less noisy than the last round alone);
- forgetting: per site, the drop of the global model's mean Dice below its best so far, summed over
  rounds (0 when every round is at least as good as all earlier ones), then summed over sites;
- communication: megabytes moved per round (to and from every site) and in total;
- wall time of the run.
The report states the winner of each measure in plain words, FedRef or not, and the participation setting
(every site every round, or k of K per round). With several seeds per algorithm, values are means over seeds
and each algorithm's difference to FedAvg is paired seed by seed, with a 95% t-interval.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import os
import statistics
import time

from fedseg.app.artifacts import RunArtifacts, load_run
from fedseg.app.challenge_score import convergence, convergence_text
from fedseg.app.plots import Series, best_so_far_png, dice_curves_png
from fedseg.app.report import (
    area_under_curve,
    communication_mb,
    curves,
    final_scores,
    last_rounds_mean,
    participation,
    pooled,
)
from fedseg.app.report_html import DISCLAIMER
from fedseg.atomic import atomic_directory, write_json
from fedseg.fedref import DEFAULT_VARIANT


def overall_curve(run: RunArtifacts) -> list[dict]:
    source, sites = final_scores(run)
    return [r for r in curves(run, source, sites) if r["site"] == "overall"]


def site_curves(run: RunArtifacts) -> dict[str, list[float]]:
    """site -> mean Dice of the global model per round (rounds the site missed are skipped)."""
    source, sites = final_scores(run)
    out: dict[str, list[float]] = {}
    for row in curves(run, source, sites):
        if row["site"] != "overall" and row["dice_mean"] is not None:
            out.setdefault(row["site"], []).append(row["dice_mean"])
    return out


def forgetting(values: list[float]) -> float:
    """Sum over rounds of (best so far - current): how much a site lost of what it once had."""
    best, total = float("-inf"), 0.0
    for value in values:
        best = max(best, value)
        total += best - value
    return total


def rounds_to_target(curve: list[dict], target: float) -> int | None:
    for row in curve:
        if row["dice_mean"] is not None and row["dice_mean"] >= target:
            return int(row["round"])
    return None


def run_label(run: RunArtifacts) -> str:
    """The algorithm, with FedRef's variant when it is not the default prior (fedref-mean, fedref-diagonal).

    A run recorded before there were variants used the mean prior.
    """
    variant = run.run_info.get("settings", {}).get("fedref_variant", "mean")
    return f"fedref-{variant}" if run.algorithm == "fedref" and variant != DEFAULT_VARIANT else run.algorithm


def summarise(run: RunArtifacts, target: float) -> dict:
    source, sites = final_scores(run)
    curve = overall_curve(run)
    per_site_forgetting = {site: forgetting(v) for site, v in site_curves(run).items()}
    mb = communication_mb(run)
    return {
        "algorithm": run_label(run),
        "seed": run.run_info.get("settings", {}).get("seed"),
        "participation": participation(run),
        "auc": area_under_curve(curve),
        "last3_dice_mean": last_rounds_mean(curve),
        "run_folder": run.folder,
        "rounds": len(run.rounds),
        "final": {"source": source, "overall": pooled(sites), "sites": sites},
        "rounds_to_target": rounds_to_target(curve, target),
        "forgetting": {"total": sum(per_site_forgetting.values()), "sites": per_site_forgetting},
        "mb_per_round": sum(mb) / len(mb) if mb else 0.0,
        "mb_total": sum(mb),
        "wall_seconds": run.run_info.get("wall_seconds"),
        "challenge": convergence(run),
        "curve": curve,
    }


MEASURES = [
    # key, label, better ("max"/"min"), how to read it from a summary
    ("final_dice_mean", "final mean Dice", "max", lambda s: s["final"]["overall"]["dice_mean"]),
    ("final_dice_tc", "final Dice TC", "max", lambda s: s["final"]["overall"]["dice_tc"]),
    ("final_dice_wt", "final Dice WT", "max", lambda s: s["final"]["overall"]["dice_wt"]),
    ("final_dice_et", "final Dice ET", "max", lambda s: s["final"]["overall"]["dice_et"]),
    (
        "worst_site_dice",
        "worst site's final mean Dice",
        "max",
        lambda s: min(
            (v["dice_mean"] for v in s["final"]["sites"].values() if v["dice_mean"] is not None), default=None
        ),
    ),
    ("last3_dice_mean", "mean Dice of the last 3 rounds", "max", lambda s: s["last3_dice_mean"]),
    ("auc", "area under the Dice curve (mean over rounds)", "max", lambda s: s["auc"]),
    ("rounds_to_target", "rounds to the target mean Dice", "min", lambda s: s["rounds_to_target"]),
    ("forgetting", "forgetting (summed Dice drops)", "min", lambda s: s["forgetting"]["total"]),
    ("mb_total", "megabytes moved in total", "min", lambda s: s["mb_total"]),
    ("wall_seconds", "wall time (s)", "min", lambda s: s["wall_seconds"]),
    ("convergence_score", "FeTS Challenge convergence score", "max", lambda s: _clock(s, "convergence_score")),
    ("simulated_hours", "simulated hours on the challenge clock", "min", lambda s: _clock(s, "simulated_hours")),
]
CLOCK_MEASURES = ("convergence_score", "simulated_hours")  # left out of a comparison of runs without the clock


def _clock(summary: dict, key: str):
    return (summary.get("challenge") or {}).get(key)


PAIRED_MEASURES = ("final_dice_mean", "auc", "last3_dice_mean", "forgetting", "rounds_to_target", "convergence_score")
PAIRED_BASELINES = ("fedavg", "fedpidavg")  # FedAvg, and the FeTS 2022 winner when it is in the comparison
T_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t_quantile(df: int) -> float:
    """Student's t 0.975 quantile; between tabulated degrees of freedom the next lower one (a wider interval)."""
    return T_975[max(k for k in T_975 if k <= df)]


def paired_interval(differences: list[float]) -> dict:
    """Mean of paired differences and its 95% t-interval; no interval from a single pair."""
    n = len(differences)
    mean = statistics.mean(differences)
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    half = t_quantile(n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def paired_differences(summaries: list[dict], baseline: str = "fedavg") -> list[dict]:
    """Each algorithm minus the baseline, seed by seed (same seed: same initial model, data order and sites)."""
    read = {key: fn for key, _, _, fn in MEASURES}
    base = {s["seed"]: s for s in summaries if s["algorithm"] == baseline}
    out = []
    for algorithm in dict.fromkeys(s["algorithm"] for s in summaries if s["algorithm"] != baseline):
        pairs = [(s, base[s["seed"]]) for s in summaries if s["algorithm"] == algorithm and s["seed"] in base]
        for key in PAIRED_MEASURES:
            diffs = [
                read[key](a) - read[key](b) for a, b in pairs if read[key](a) is not None and read[key](b) is not None
            ]
            if diffs:
                out.append({"algorithm": algorithm, "baseline": baseline, "measure": key, **paired_interval(diffs)})
    return out


def interval_text(row: dict) -> str:
    if row["low"] is None:
        return f"{row['mean']:+.3f} (one seed: no interval)"
    return f"{row['mean']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]"


def winners(summaries: list[dict]) -> list[dict]:
    """For each measure: the best value (the mean over seeds), the algorithms that reach it, where FedRef stands."""
    out = []
    for key, label, better, read in MEASURES:
        per_algorithm: dict[str, list] = {}
        for s in summaries:
            per_algorithm.setdefault(s["algorithm"], []).append(read(s))
        values = {
            a: (statistics.mean(v for v in vs if v is not None) if any(v is not None for v in vs) else None)
            for a, vs in per_algorithm.items()
        }
        present = {a: v for a, v in values.items() if v is not None}
        if not present and key in CLOCK_MEASURES:
            continue
        if not present:
            out.append({"measure": key, "label": label, "winners": [], "best": None, "values": values})
            continue
        best = max(present.values()) if better == "max" else min(present.values())
        tolerance = 1e-9 if key not in ("wall_seconds",) else 0.0
        won = sorted(a for a, v in present.items() if abs(v - best) <= tolerance)
        out.append({"measure": key, "label": label, "better": better, "best": best, "winners": won, "values": values})
    return out


def sentences(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if not r["winners"]:
            lines.append(f"{r['label']}: no algorithm reached it.")
            continue
        who = " and ".join(r["winners"])
        fedref = r["values"].get("fedref")
        line = f"{r['label']}: {who} won ({_fmt(r['best'])})."
        if "fedref" in r["values"] and "fedref" not in r["winners"]:
            line += f" FedRef did not win here ({_fmt(fedref)})."
        lines.append(line)
    return lines


def _fmt(value) -> str:
    if value is None:
        return "never"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def curves_png(summaries: list[dict]) -> bytes:
    """Dice per region over rounds, one line per run (FedRef's in black), named by seed when there are several."""
    several = len({s.get("seed") for s in summaries}) > 1
    series = [
        Series(
            f"{s['algorithm']} (seed {s.get('seed')})" if several else s["algorithm"],
            s["curve"],
            dict(linewidth=2.4, color="black") if s["algorithm"].startswith("fedref") else dict(linewidth=1.3),
        )
        for s in summaries
    ]
    return dice_curves_png(series, title_suffix=" (all validation cases)")


def participation_text(summaries: list[dict]) -> str:
    """The participation setting(s) of the compared runs, for the report's header."""
    settings = sorted({s.get("participation", "?") for s in summaries})
    return settings[0] if len(settings) == 1 else "mixed: " + "; ".join(settings)


def site_mean(summaries: list[dict], algorithm: str, site: str) -> float | None:
    values = [s["final"]["sites"].get(site, {}).get("dice_mean") for s in summaries if s["algorithm"] == algorithm]
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def render(
    summaries: list[dict], results: list[dict], target: float, png: bytes, paired: list[dict] | None = None
) -> str:
    algos = list(dict.fromkeys(s["algorithm"] for s in summaries))
    seeds = sorted({s.get("seed") for s in summaries}, key=str)
    head = "".join(f"<th>{html.escape(a)}</th>" for a in algos)
    rows = ""
    for r in results:
        cells = ""
        for a in algos:
            value = r["values"].get(a)
            strong = a in r["winners"]
            cells += f"<td>{'<b>' if strong else ''}{_fmt(value)}{'</b>' if strong else ''}</td>"
        rows += f"<tr><td>{html.escape(r['label'])}</td>{cells}</tr>"
    sites = sorted({site for s in summaries for site in s["final"]["sites"]})
    site_rows = "".join(
        f"<tr><td>{html.escape(site)}</td>"
        + "".join(f"<td>{_fmt(site_mean(summaries, a, site))}</td>" for a in algos)
        + "</tr>"
        for site in sites
    )
    paired_rows = "".join(
        f"<tr><td>{html.escape(r['algorithm'])}</td><td>{html.escape(r['baseline'])}</td>"
        f"<td>{html.escape(r['measure'])}</td><td>{r['n']}</td>"
        f"<td>{html.escape(interval_text(r))}</td></tr>"
        for r in paired or []
    )
    words = "".join(f"<li>{html.escape(line)}</li>" for line in sentences(results))
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>FedRef-Seg comparison</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }} th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }} img {{ max-width: 100%; }}
.note {{ background: #fff4e0; border-left: 4px solid #e69a00; padding: 0.5em 1em; }}</style></head><body>
<h1>Algorithm comparison</h1>
<p class="note">{html.escape(DISCLAIMER)}</p>
<p>Same prepared data, seeds, network, local epochs and rounds for every algorithm; target mean Dice {target:.2f}.
Participation: <b>{html.escape(participation_text(summaries))}</b>. Seeds: {html.escape(", ".join(map(str, seeds)))}
(values are means over seeds). Bold: the best value of each measure.</p>
{clock_note(summaries)}
<h2>Who won what</h2><ul>{words}</ul>
<table><tr><th>measure</th>{head}</tr>{rows}</table>
<h2>Difference to FedAvg (and FedPIDAvg), paired by seed (95% t-interval)</h2>
<table><tr><th>algorithm</th><th>minus</th><th>measure</th><th>seeds</th><th>mean difference [95% interval]</th></tr>{paired_rows}</table>
<h2>Final mean Dice per site</h2><table><tr><th>site</th>{head}</tr>{site_rows}</table>
<h2>Learning curves</h2><img alt="Dice per region over rounds, one line per algorithm" src="data:image/png;base64,{image}">
<p>Forgetting: per site, the drop of the global model's mean Dice below its best so far, summed over rounds,
then summed over sites. Megabytes: the global model to every answering site and their updates back.</p>
<p>Generated {time.strftime("%Y-%m-%d %H:%M")}.</p></body></html>
"""


def clock_note(summaries: list[dict]) -> str:
    """The runs on the FeTS Challenge clock, one line each, and their best-so-far Dice over simulated time."""
    clocked = [s for s in summaries if s.get("challenge")]
    if not clocked:
        return ""
    lines = "".join(
        f"<li>{html.escape(s['algorithm'])}, seed {s.get('seed')}: {html.escape(convergence_text(s['challenge']))}</li>"
        for s in clocked
    )
    png = best_so_far_png(
        [(f"{s['algorithm']} (seed {s.get('seed')})", s["challenge"]["per_round"]) for s in clocked],
        max(s["challenge"]["budget_hours"] for s in clocked),
    )
    image = base64.b64encode(png).decode("ascii")
    return (
        f'<h2>Simulated time (FeTS Challenge clock)</h2><ul>{lines}</ul><img alt="best-so-far mean Dice over '
        f'simulated hours, one line per run" src="data:image/png;base64,{image}">'
    )


def write_comparison(run_folders: list[str], out_dir: str, target: float = 0.8) -> str:
    """Compare finished runs; writes compare.html, compare.json and compare.csv atomically."""
    summaries = [summarise(load_run(folder), target) for folder in run_folders]
    results = winners(summaries)
    paired = [row for baseline in PAIRED_BASELINES for row in paired_differences(summaries, baseline)]
    png = curves_png(summaries)
    with atomic_directory(out_dir) as tmp:
        write_json(
            os.path.join(tmp, "compare.json"),
            {
                "target": target,
                "participation": participation_text(summaries),
                "winners": results,
                "sentences": sentences(results),
                "paired_differences": paired,
                "runs": summaries,
            },
        )
        with open(os.path.join(tmp, "compare.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            algos = list(dict.fromkeys(s["algorithm"] for s in summaries))
            writer.writerow(["measure"] + algos + ["winners"])
            for r in results:
                writer.writerow([r["measure"]] + [r["values"].get(a) for a in algos] + [" ".join(r["winners"])])
            for r in paired:
                writer.writerow(
                    [
                        f"{r['measure']} minus {r['baseline']} (n={r['n']}, 95% low, high)",
                        r["algorithm"],
                        r["mean"],
                        r["low"],
                        r["high"],
                    ]
                )
        with open(os.path.join(tmp, "compare_curves.png"), "wb") as f:
            f.write(png)
        with open(os.path.join(tmp, "compare.html"), "w", encoding="utf-8") as f:
            f.write(render(summaries, results, target, png, paired))
    return os.path.join(os.path.abspath(out_dir), "compare.html")
