"""Dice and HD95 per tumour region (TC, WT, ET), computed with MONAI's metrics.

Conventions for empty masks follow the BraTS evaluation: a region absent from both the ground truth and
the prediction scores Dice 1 and HD95 0; absent from only one of them, Dice 0 and HD95 ``MISSED_HD95_MM``,
BraTS's fixed 373.13 mm (the diagonal of a 240x240x155 1 mm volume). A fixed value, not the case's own
brain-box diagonal: that would be a measurement of the patient's head, sent in the site's metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from fedseg.regions import REGIONS

DICE_KEYS = tuple(f"dice_{r.lower()}" for r in REGIONS)
HD95_KEYS = tuple(f"hd95_{r.lower()}" for r in REGIONS)
METRIC_KEYS = DICE_KEYS + ("dice_mean",) + HD95_KEYS
MISSED_HD95_MM = 373.13  # BraTS: HD95 of a region present in only one of prediction and truth


def case_scores(prediction: torch.Tensor, label: torch.Tensor, spacing: Sequence[float] | None = None) -> dict:
    """Dice and HD95 per region for one case.

    prediction, label: boolean/0-1 tensors of shape (3, X, Y, Z), channels in REGIONS order.
    spacing: voxel size in mm (defaults to 1 mm isotropic).
    """
    if prediction.shape != label.shape or prediction.shape[0] != len(REGIONS):
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} must both be (3, X, Y, Z)"
        )
    spacing = [float(s) for s in (spacing if spacing is not None else (1.0,) * (prediction.ndim - 1))]
    pred = prediction.detach().float().cpu()[None]
    true = label.detach().float().cpu()[None]
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred, true)[0]
    present = [i for i in range(len(REGIONS)) if bool(pred[0, i].any()) and bool(true[0, i].any())]
    hd95 = {}
    if present:  # distances are defined only where both masks have voxels; empties follow BraTS below
        distances = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            pred[:, present], true[:, present], spacing=spacing
        )[0]
        hd95 = {i: float(d) for i, d in zip(present, distances)}
    scores = {}
    for i, region in enumerate(REGIONS):
        has_pred, has_true = bool(pred[0, i].any()), bool(true[0, i].any())
        if not has_pred and not has_true:
            d, h = 1.0, 0.0
        elif not has_pred or not has_true:
            d, h = 0.0, MISSED_HD95_MM
        else:
            d, h = float(dice[i]), hd95[i]
        scores[f"dice_{region.lower()}"] = d
        scores[f"hd95_{region.lower()}"] = h
    scores["dice_mean"] = float(np.mean([scores[k] for k in DICE_KEYS]))
    return scores


class RegionMetrics:
    """Accumulates per-case scores over a validation set and summarises them."""

    def __init__(self) -> None:
        self.cases: list[dict] = []

    def add(self, prediction: torch.Tensor, label: torch.Tensor, spacing: Sequence[float] | None = None) -> dict:
        scores = case_scores(prediction, label, spacing)
        self.cases.append(scores)
        return scores

    def summary(self, min_cases: int = 0) -> dict:
        """Mean and (population) standard deviation of every metric over cases, plus ``n_cases``.

        Population sd (ddof 0) so that a report can pool sites exactly from (n, mean, sd). NaN when there
        were no cases. With fewer than ``min_cases`` cases (the site's ``min_val_cases``) the sd keys are left
        out: with the mean, a spread over two or three cases comes close to giving each case's score.
        """
        out: dict = {}
        with_sd = len(self.cases) >= min_cases
        for key in METRIC_KEYS:
            values = [c[key] for c in self.cases]
            out[key] = float(np.mean(values)) if values else float("nan")
            if with_sd:
                out[f"{key}_sd"] = float(np.std(values)) if values else float("nan")
        out["n_cases"] = len(self.cases)
        return out
