"""FedRef's server-side step: a reference model from recent global models and a MAP update around it.

Round r: the server broadcast theta_r, sites returned local models theta_k with weights n_k, and FedAvg
gives their weighted mean theta_bar. FedRef then returns the minimiser of

    J(theta) = 1/2 sum_k w_k |theta - theta_k|^2 + lambda1/2 |theta - theta_r|^2 + lambda2/2 |theta - theta_ref|^2

which is  theta_{r+1} = (theta_bar + lambda1 theta_r + lambda2 theta_ref) / (1 + lambda1 + lambda2).
theta_ref is a weighted mean of the reference buffer, the last p broadcast global models (theta_r included):
a Gaussian prior centred on what earlier rounds learned. Until the buffer holds p models the round is plain
FedAvg (warm-up). Only floating-point tensors are updated; integer buffers keep the FedAvg value.

This module knows nothing of FLARE: parameters are dicts of name -> numpy array or torch tensor.
The authors' reference code subtracts a scalar norm from every weight; we implement the objective above.

Variants of the prior (``variant``, one option; derivations in each closed form's docstring):
- ``mean``: theta_ref = weighted mean of the buffer (the default, as above);
- ``trend``: theta_ref = the least-squares line through the buffer, one round ahead, so steady progress
  is not damped (with lambda1 = 0) while an oscillation is;
- ``diagonal``: a per-layer Gaussian prior centred on the trend, whose precision comes from how stable
  the layer was across the buffer, weighed against how much the sites disagree this round.
``momentum`` > 0 adds server momentum before the MAP pull (any variant).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

REFERENCE_WEIGHTINGS = ("uniform", "linear")
VARIANTS = ("mean", "trend", "diagonal")
DEFAULT_ALPHA_MAX = 0.5  # diagonal: the largest share of the pull toward the prior centre
# FedRef's defaults, written once: the controller, JobSettings and the commands take them from here. Chosen from
# bench.long_horizon (docs/benchmarks.md): the trend prior at lambda1 0, lambda2 0.3 beat the mean prior at
# 0.1/0.1 on the area under the Dice curve on 5 of 5 paired seeds (p and the lambdas were not swept).
DEFAULT_VARIANT = "trend"
DEFAULT_BUFFER_SIZE = 3
DEFAULT_LAMBDA1 = 0.0
DEFAULT_LAMBDA2 = 0.3


def is_float_tensor(value: Any) -> bool:
    """True for floating-point numpy arrays and torch tensors (the parameters FedRef moves)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    if hasattr(value, "is_floating_point"):
        return bool(value.is_floating_point())
    return bool(np.issubdtype(dtype, np.floating))


def _copy(value: Any) -> Any:
    if hasattr(value, "detach"):
        return value.detach().clone()
    return np.array(value, copy=True)


def reference_weights(count: int, weighting: str = "uniform") -> list[float]:
    """Weights a_i of the buffered models, oldest first, summing to 1.

    ``uniform``: a_i = 1/count. ``linear``: a_i proportional to i (the newest model weighs most).
    """
    if count < 1:
        raise ValueError("the reference buffer is empty")
    if weighting == "uniform":
        raw = [1.0] * count
    elif weighting == "linear":
        raw = [float(i + 1) for i in range(count)]
    else:
        raise ValueError(f"unknown reference weighting {weighting!r}; choose one of {REFERENCE_WEIGHTINGS}")
    total = sum(raw)
    return [w / total for w in raw]


def trend_coefficients(count: int) -> list[float]:
    """Weights c_i (oldest first) of the least-squares line through ``count`` models, evaluated one round ahead.

    Fit B_t = a + b t at t = 1..p and predict t = p + 1: with tm = (p + 1) / 2 and S = sum_t (t - tm)^2,
    c_t = 1/p + (p + 1 - tm)(t - tm) / S. The c_t sum to 1 (an affine, not a convex, combination: the
    oldest weighs negatively), so the prediction moves with any shift of all models. p = 3 gives
    (-2, 1, 4) / 3, i.e. (4 B3 + B2 - 2 B1) / 3; p = 1 has no slope and gives B1.
    """
    if count < 1:
        raise ValueError("the reference buffer is empty")
    if count == 1:
        return [1.0]
    middle = (count + 1) / 2
    spread = sum((t - middle) ** 2 for t in range(1, count + 1))
    return [1.0 / count + (count + 1 - middle) * (t - middle) / spread for t in range(1, count + 1)]


def combine(models: list[Mapping[str, Any]], weights: list[float]) -> dict[str, Any]:
    """sum_i weights_i models_i, per tensor (the models share their keys)."""
    out: dict[str, Any] = {}
    for a, model in zip(weights, models):
        for name, value in model.items():
            out[name] = a * value if name not in out else out[name] + a * value
    return out


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def _cast_like(value: Any, like: Any) -> Any:
    return value.to(like.dtype) if hasattr(value, "to") else np.asarray(value, dtype=like.dtype)


class ReferenceBuffer:
    """The last ``capacity`` broadcast global models (their floating-point tensors), oldest first.

    Memory is O(capacity x model size). ``state()``/``from_state()`` let the server persist the buffer
    next to its checkpoint so that a restarted server resumes with the same reference model.
    """

    def __init__(self, capacity: int) -> None:
        if int(capacity) < 1:
            raise ValueError(f"reference buffer size p must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._models: deque[dict[str, Any]] = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self._models)

    @property
    def is_full(self) -> bool:
        return len(self._models) == self.capacity

    def push(self, params: Mapping[str, Any]) -> None:
        """Store a copy of a global model's floating-point tensors; the oldest drops out when full."""
        self._models.append({k: _copy(v) for k, v in params.items() if is_float_tensor(v)})

    @property
    def models(self) -> list[dict[str, Any]]:
        return list(self._models)

    def reference_model(self, weighting: str = "uniform") -> dict[str, Any]:
        """theta_ref = sum_i a_i B_i over the buffered models."""
        return combine(self.models, reference_weights(len(self._models), weighting))

    def trend_model(self) -> dict[str, Any]:
        """The least-squares line through the buffered models, one round ahead (``trend_coefficients``)."""
        return combine(self.models, trend_coefficients(len(self._models)))

    def layer_variance(self) -> dict[str, float]:
        """s2 per tensor: the variance of each parameter across the buffered models, averaged over the tensor."""
        out: dict[str, float] = {}
        for name in self._models[-1] if self._models else {}:
            stacked = np.stack([_as_numpy(m[name]) for m in self._models])
            out[name] = float(stacked.var(axis=0).mean()) if stacked.size else 0.0
        return out

    def state(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "models": [dict(m) for m in self._models]}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ReferenceBuffer:
        buffer = cls(state["capacity"])
        for model in state["models"]:
            buffer.push(model)
        return buffer


def map_step(
    averaged: Mapping[str, Any],
    previous_global: Mapping[str, Any],
    reference: Mapping[str, Any],
    lambda1: float,
    lambda2: float,
) -> dict[str, Any]:
    """theta_{r+1} = (theta_bar + lambda1 theta_r + lambda2 theta_ref) / (1 + lambda1 + lambda2).

    ``averaged`` is the FedAvg model theta_bar; keys that are not floating point (or missing from the
    previous global or reference model) keep the FedAvg value. Inputs are not modified.
    """
    if lambda1 < 0 or lambda2 < 0:
        raise ValueError(f"lambda1 and lambda2 must be >= 0, got {lambda1}, {lambda2}")
    denominator = 1.0 + lambda1 + lambda2
    updated: dict[str, Any] = {}
    for name, mean in averaged.items():
        if is_float_tensor(mean) and name in previous_global and name in reference:
            value = (mean + lambda1 * previous_global[name] + lambda2 * reference[name]) / denominator
            updated[name] = value.to(mean.dtype) if hasattr(value, "to") else np.asarray(value, dtype=mean.dtype)
        else:
            updated[name] = mean
    return updated


def site_disagreement(
    site_models: list[tuple[float, Mapping[str, Any]]], averaged: Mapping[str, Any]
) -> dict[str, float]:
    """v per tensor: sum_k w_k (theta_k - theta_bar)^2 with w_k the normalised site weights, averaged over the tensor."""
    total = sum(float(w) for w, _ in site_models)
    if total <= 0:
        raise ValueError("site weights must sum to a positive number")
    out: dict[str, float] = {}
    for name, mean in averaged.items():
        if not is_float_tensor(mean):
            continue
        centre = _as_numpy(mean)
        out[name] = float(
            sum(float(w) / total * np.mean((_as_numpy(m[name]) - centre) ** 2) for w, m in site_models if name in m)
        )
    return out


def diagonal_shares(
    disagreement: Mapping[str, float],
    stability: Mapping[str, float],
    lambda2: float,
    alpha_max: float = DEFAULT_ALPHA_MAX,
) -> dict[str, float]:
    """alpha per tensor = min(alpha_max, lambda2 v / (lambda2 v + s2)); 0 where both are 0 (nothing to weigh).

    Derivation: read the sites' mean as a noisy measurement theta_bar ~ N(theta, v) (v: how much the sites
    disagree this round) and the prior as theta ~ N(mu, s2 / lambda2) (s2: how much the layer moved across
    the buffer). The posterior mean is (theta_bar / v + lambda2 mu / s2) / (1 / v + lambda2 / s2)
    = theta_bar + alpha (mu - theta_bar) with alpha = lambda2 v / (lambda2 v + s2): the pull is strong where
    the sites disagree and the layer was stable, and vanishes where the layer is moving. s2 from p models
    is a noisy estimate (p - 1 degrees of freedom), hence the cap alpha_max.
    """
    if lambda2 < 0 or not 0 <= alpha_max <= 1:
        raise ValueError(f"need lambda2 >= 0 and 0 <= alpha_max <= 1, got {lambda2}, {alpha_max}")
    shares = {}
    for name, v in disagreement.items():
        weight = lambda2 * v
        denominator = weight + stability.get(name, 0.0)
        shares[name] = min(alpha_max, weight / denominator) if denominator > 0 else 0.0
    return shares


def diagonal_step(
    averaged: Mapping[str, Any], centre: Mapping[str, Any], shares: Mapping[str, float]
) -> dict[str, Any]:
    """theta_{r+1} = theta_bar + alpha (.) (mu - theta_bar), one alpha per tensor (see ``diagonal_shares``).

    Each output is a convex combination of theta_bar and mu; tensors without a share keep the FedAvg value.
    """
    updated: dict[str, Any] = {}
    for name, mean in averaged.items():
        alpha = shares.get(name, 0.0)
        if is_float_tensor(mean) and name in centre and alpha > 0:
            updated[name] = _cast_like(mean + alpha * (centre[name] - mean), mean)
        else:
            updated[name] = mean
    return updated


def momentum_step(
    averaged: Mapping[str, Any], previous_global: Mapping[str, Any], velocity: dict[str, Any] | None, beta: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Server momentum on the FedAvg update: m <- beta m + (theta_bar - theta_r); returns (theta_r + m, m).

    beta = 0 returns theta_bar itself (the velocity is then the plain update). FedAvgM's rule with server
    learning rate 1; the MAP pull is applied to its output.
    """
    moved: dict[str, Any] = {}
    new_velocity: dict[str, Any] = {}
    for name, mean in averaged.items():
        if is_float_tensor(mean) and name in previous_global:
            step = mean - previous_global[name]
            if velocity is not None and name in velocity and beta:
                step = beta * velocity[name] + step
            new_velocity[name] = step
            moved[name] = _cast_like(previous_global[name] + step, mean) if beta else mean
        else:
            moved[name] = mean
    return moved, new_velocity


def step_ratio(
    new_global: Mapping[str, Any], averaged: Mapping[str, Any], previous_global: Mapping[str, Any]
) -> float | None:
    """|theta_{r+1} - theta_r| / |theta_bar - theta_r| over every floating-point tensor (1 for plain FedAvg).

    Below 1: the server step damps the sites' progress; above 1: it extrapolates. None when the sites
    did not move the model at all.
    """
    moved = proposed = 0.0
    for name, mean in averaged.items():
        if is_float_tensor(mean) and name in previous_global and name in new_global:
            before = _as_numpy(previous_global[name])
            moved += float(np.sum((_as_numpy(new_global[name]) - before) ** 2))
            proposed += float(np.sum((_as_numpy(mean) - before) ** 2))
    return float(np.sqrt(moved / proposed)) if proposed > 0 else None


class FedRefUpdater:
    """One object per federation: holds the buffer and turns each round's FedAvg model into FedRef's.

    Call ``start(theta_0)`` with the first broadcast model, then ``update(theta_bar, theta_r)`` once per
    round; it returns theta_{r+1} and pushes it into the buffer (it becomes the next broadcast model).
    ``variant`` picks the prior (``VARIANTS``); ``diagonal`` also needs the round's site models.
    ``last_step_ratio`` is the round's |theta_{r+1} - theta_r| / |theta_bar - theta_r|.
    """

    def __init__(
        self,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        lambda1: float = DEFAULT_LAMBDA1,
        lambda2: float = DEFAULT_LAMBDA2,
        reference_weighting: str = "uniform",
        variant: str = DEFAULT_VARIANT,
        momentum: float = 0.0,
        alpha_max: float = DEFAULT_ALPHA_MAX,
    ) -> None:
        reference_weights(1, reference_weighting)  # validate the name early
        if lambda1 < 0 or lambda2 < 0:
            raise ValueError(f"lambda1 and lambda2 must be >= 0, got {lambda1}, {lambda2}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown FedRef variant {variant!r}; choose one of {VARIANTS}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.reference_weighting = reference_weighting
        self.variant = variant
        self.momentum = float(momentum)
        self.alpha_max = float(alpha_max)
        self.buffer = ReferenceBuffer(buffer_size)
        self.velocity: dict[str, Any] | None = None
        self.last_step_ratio: float | None = None
        self.last_shares: dict[str, float] = {}

    def start(self, initial_global: Mapping[str, Any]) -> None:
        if len(self.buffer) == 0:
            self.buffer.push(initial_global)

    def update(
        self,
        averaged: Mapping[str, Any],
        previous_global: Mapping[str, Any],
        site_models: list[tuple[float, Mapping[str, Any]]] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Returns (theta_{r+1}, applied): applied is False during warm-up (FedAvg, with momentum if set).

        ``site_models``: (weight, parameters) of the sites aggregated this round; needed by ``diagonal``.
        """
        if len(self.buffer) == 0:
            self.buffer.push(previous_global)
        proposal = dict(averaged)
        if self.momentum:
            proposal, self.velocity = momentum_step(averaged, previous_global, self.velocity, self.momentum)
        applied = self.buffer.is_full
        new_global = self.prior_step(proposal, averaged, previous_global, site_models) if applied else proposal
        self.last_step_ratio = step_ratio(new_global, averaged, previous_global)
        self.buffer.push(new_global)
        return new_global, applied

    def prior_step(
        self,
        proposal: Mapping[str, Any],
        averaged: Mapping[str, Any],
        previous_global: Mapping[str, Any],
        site_models: list[tuple[float, Mapping[str, Any]]] | None,
    ) -> dict[str, Any]:
        """The variant's MAP step from the (momentum-moved) FedAvg model, with a full buffer."""
        if self.variant == "mean":
            return map_step(
                proposal,
                previous_global,
                self.buffer.reference_model(self.reference_weighting),
                self.lambda1,
                self.lambda2,
            )
        if self.variant == "trend":
            return map_step(proposal, previous_global, self.buffer.trend_model(), self.lambda1, self.lambda2)
        if not site_models:
            raise ValueError("the diagonal variant needs the round's site models")
        self.last_shares = diagonal_shares(
            site_disagreement(site_models, averaged), self.buffer.layer_variance(), self.lambda2, self.alpha_max
        )
        return diagonal_step(proposal, self.buffer.trend_model(), self.last_shares)
