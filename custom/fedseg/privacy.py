"""The site's privacy filter: NVFlare's percentile sparsification with a clip that the job cannot widen.

NVFlare's ``PercentilePrivacy`` divides a weight difference by the round's step count
(``NUM_STEPS_CURRENT_ROUND`` in the result's meta), zeroes and clips that per-step change to ``gamma`` and
multiplies back: each sent value is bounded by ``gamma x steps``, and the steps are the job's choice (a job
with 10^6 local steps sends what it likes). Here ``gamma`` bounds each value of the round's update itself,
whatever the steps; the zeroed share (``percentile``) is the same as NVFlare's (scaling every value by one
number does not move a percentile).
"""

from __future__ import annotations

import numpy as np
import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy as NVFlarePercentilePrivacy


class PercentilePrivacy(NVFlarePercentilePrivacy):
    """Zero the ``percentile``% smallest changes of the round's update, clip the rest to +-``gamma`` per round.

    Args as NVFlare's: ``percentile`` (0..100), ``gamma`` (> 0: the largest change of one value in one
    round), ``data_kinds`` (the site policy uses WEIGHT_DIFF). Bad arguments are refused when the site's
    policy is loaded, not skipped at every update as NVFlare's filter does.
    """

    def __init__(self, percentile=10, gamma=0.01, data_kinds: list[str] | None = None) -> None:
        super().__init__(percentile=percentile, gamma=gamma, data_kinds=data_kinds)
        for name, value in (("percentile", percentile), ("gamma", gamma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"PercentilePrivacy: {name} must be a number, got {value!r}")
        if not 0 <= percentile <= 100 or gamma <= 0:
            raise ValueError(f"PercentilePrivacy: percentile must be 0..100 and gamma > 0, got {percentile}, {gamma}")

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        arrays = {name: _numpy(value) for name, value in dxo.data.items()}
        floating = [a for a in arrays.values() if a.ndim > 0 and np.issubdtype(a.dtype, np.floating)]
        if not floating:
            return dxo
        magnitudes = np.concatenate([np.abs(a.ravel()) for a in floating])
        cutoff = np.percentile(magnitudes, self.percentile)
        self.log_info(
            fl_ctx, f"max |update| {magnitudes.max():.3g}, cutoff {cutoff:.3g}, clip {self.gamma} (per round)"
        )
        out = {}
        for name, value in dxo.data.items():
            array = arrays[name]
            if array.ndim == 0 or not np.issubdtype(array.dtype, np.floating):
                out[name] = value  # scalars and integer buffers pass, as in NVFlare's filter
                continue
            kept = np.where(np.abs(array) < cutoff, 0.0, array).astype(array.dtype)
            kept = np.clip(kept, -self.gamma, self.gamma)
            out[name] = torch.from_numpy(kept) if isinstance(value, torch.Tensor) else kept
        dxo.data = out
        return dxo


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
