"""Compare algorithms run on the same data, seeds, network and rounds: who wins on which measure.

Measures, all from the runs' artifacts:
- Dice per region over rounds (pooled over all validation cases), final Dice overall and per site;
- rounds to reach a target mean Dice (first round whose global model reaches it; None if never);
- forgetting: per site, the drop of the global model's mean Dice below its best so far, summed over
  rounds (0 when every round is at least as good as all earlier ones), then summed over sites;
- communication: megabytes moved per round (to and from every site) and in total;
- wall time of the run.
The report states the winner of each measure in plain words, FedRef or not.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import time

from fedseg.app.artifacts import RunArtifacts, load_run
from fedseg.app.report import DISCLAIMER, communication_mb, curves, final_scores, pooled
from fedseg.atomic import atomic_directory, write_json

REGIONS = (("dice_tc", "TC"), ("dice_wt", "WT"), ("dice_et", "ET"), ("dice_mean", "mean"))


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


def summarise(run: RunArtifacts, target: float) -> dict:
    source, sites = final_scores(run)
    curve = overall_curve(run)
    per_site_forgetting = {site: forgetting(v) for site, v in site_curves(run).items()}
    mb = communication_mb(run)
    return {
        "algorithm": run.algorithm,
        "run_folder": run.folder,
        "rounds": len(run.rounds),
        "final": {"source": source, "overall": pooled(sites), "sites": sites},
        "rounds_to_target": rounds_to_target(curve, target),
        "forgetting": {"total": sum(per_site_forgetting.values()), "sites": per_site_forgetting},
        "mb_per_round": sum(mb) / len(mb) if mb else 0.0,
        "mb_total": sum(mb),
        "wall_seconds": run.run_info.get("wall_seconds"),
        "curve": curve,
    }


MEASURES = [
    # key, label, better ("max"/"min"), how to read it from a summary
    ("final_dice_mean", "final mean Dice", "max", lambda s: s["final"]["overall"]["dice_mean"]),
    ("final_dice_tc", "final Dice TC", "max", lambda s: s["final"]["overall"]["dice_tc"]),
    ("final_dice_wt", "final Dice WT", "max", lambda s: s["final"]["overall"]["dice_wt"]),
    ("final_dice_et", "final Dice ET", "max", lambda s: s["final"]["overall"]["dice_et"]),
    ("worst_site_dice", "worst site's final mean Dice", "max",
     lambda s: min((v["dice_mean"] for v in s["final"]["sites"].values() if v["dice_mean"] is not None), default=None)),
    ("rounds_to_target", "rounds to the target mean Dice", "min", lambda s: s["rounds_to_target"]),
    ("forgetting", "forgetting (summed Dice drops)", "min", lambda s: s["forgetting"]["total"]),
    ("mb_total", "megabytes moved in total", "min", lambda s: s["mb_total"]),
    ("wall_seconds", "wall time (s)", "min", lambda s: s["wall_seconds"]),
]


def winners(summaries: list[dict]) -> list[dict]:
    """For each measure: the best value, the algorithms that reach it, and where FedRef stands."""
    out = []
    for key, label, better, read in MEASURES:
        values = {s["algorithm"]: read(s) for s in summaries}
        present = {a: v for a, v in values.items() if v is not None}
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), sharey=True)
    for ax, (key, title) in zip(axes, REGIONS):
        for s in summaries:
            points = [(r["round"], r[key]) for r in s["curve"] if r[key] is not None]
            if points:
                x, y = zip(*points)
                style = dict(linewidth=2.4, color="black") if s["algorithm"] == "fedref" else dict(linewidth=1.3)
                ax.plot(x, y, marker="o", markersize=3, label=s["algorithm"], **style)
        ax.set_title(f"Dice {title} (all validation cases)")
        ax.set_xlabel("aggregation rounds")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("Dice of the global model")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def render(summaries: list[dict], results: list[dict], target: float, png: bytes) -> str:
    algos = [s["algorithm"] for s in summaries]
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
        f"<tr><td>{html.escape(site)}</td>" + "".join(
            f"<td>{_fmt(s['final']['sites'].get(site, {}).get('dice_mean'))}</td>" for s in summaries) + "</tr>"
        for site in sites)
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
Bold: the best value of each measure.</p>
<h2>Who won what</h2><ul>{words}</ul>
<table><tr><th>measure</th>{head}</tr>{rows}</table>
<h2>Final mean Dice per site</h2><table><tr><th>site</th>{head}</tr>{site_rows}</table>
<h2>Learning curves</h2><img alt="Dice per region over rounds, one line per algorithm" src="data:image/png;base64,{image}">
<p>Forgetting: per site, the drop of the global model's mean Dice below its best so far, summed over rounds,
then summed over sites. Megabytes: the global model to every answering site and their updates back.</p>
<p>Generated {time.strftime('%Y-%m-%d %H:%M')}.</p></body></html>
"""


def write_comparison(run_folders: list[str], out_dir: str, target: float = 0.8) -> str:
    """Compare finished runs; writes compare.html, compare.json and compare.csv atomically."""
    summaries = [summarise(load_run(folder), target) for folder in run_folders]
    results = winners(summaries)
    png = curves_png(summaries)
    with atomic_directory(out_dir) as tmp:
        write_json(os.path.join(tmp, "compare.json"), {"target": target, "winners": results,
                                                      "sentences": sentences(results), "runs": summaries})
        with open(os.path.join(tmp, "compare.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["measure"] + [s["algorithm"] for s in summaries] + ["winners"])
            for r in results:
                writer.writerow([r["measure"]] + [r["values"].get(s["algorithm"]) for s in summaries]
                                + [" ".join(r["winners"])])
        with open(os.path.join(tmp, "compare_curves.png"), "wb") as f:
            f.write(png)
        with open(os.path.join(tmp, "compare.html"), "w", encoding="utf-8") as f:
            f.write(render(summaries, results, target, png))
    return os.path.join(os.path.abspath(out_dir), "compare.html")
