"""The Dice-over-rounds figure of the run report and of the comparison: one panel per region, one line per series.

Each series is a label, its rows (``round`` and the panel keys; a key that is None is a round without that
score, left out of the line) and its matplotlib line style.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

DICE_PANELS = (("dice_tc", "TC"), ("dice_wt", "WT"), ("dice_et", "ET"), ("dice_mean", "mean"))


@dataclass
class Series:
    label: str
    rows: list[dict]
    style: dict = field(default_factory=dict)


def dice_curves_png(series: list[Series], title_suffix: str = "") -> bytes:
    """A PNG of Dice per region over aggregation rounds (``Dice TC`` ... ``Dice mean`` + ``title_suffix``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(DICE_PANELS), figsize=(15, 3.6), sharey=True)
    for ax, (key, title) in zip(axes, DICE_PANELS):
        for line in series:
            points = [(r["round"], r[key]) for r in line.rows if r[key] is not None]
            if not points:
                continue
            x, y = zip(*points)
            ax.plot(x, y, marker="o", markersize=3, label=line.label, **line.style)
        ax.set_title(f"Dice {title}{title_suffix}")
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


def best_so_far_png(runs: list[tuple[str, list[dict]]], budget_hours: float) -> bytes:
    """A PNG of the best-so-far mean Dice over simulated hours, one step line per run: the FeTS Challenge's
    convergence score is the area under such a line up to the budget, over the budget. ``runs``: (label, the
    per-round rows of ``fedseg.app.challenge_score.clock_rounds``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for label, rows in runs:
        hours, best, x, y = 0.0, None, [0.0], [0.0]
        for row in rows:
            dice = row["dice_mean"]
            best = dice if best is None or (dice is not None and dice > best) else best
            hours += row["simulated_seconds"] / 3600
            x.append(hours)
            y.append(best or 0.0)
        ax.step(x, y, where="pre", label=label, linewidth=2.0 if label.startswith("fedref") else 1.2)
    ax.axvline(budget_hours, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("simulated hours (FeTS Challenge clock)")
    ax.set_ylabel("best mean Dice so far")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
