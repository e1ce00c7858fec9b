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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

REFERENCE_WEIGHTINGS = ("uniform", "linear")


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
        weights = reference_weights(len(self._models), weighting)
        reference: dict[str, Any] = {}
        for a, model in zip(weights, self._models):
            for name, value in model.items():
                reference[name] = a * value if name not in reference else reference[name] + a * value
        return reference

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


class FedRefUpdater:
    """One object per federation: holds the buffer and turns each round's FedAvg model into FedRef's.

    Call ``start(theta_0)`` with the first broadcast model, then ``update(theta_bar, theta_r)`` once per
    round; it returns theta_{r+1} and pushes it into the buffer (it becomes the next broadcast model).
    """

    def __init__(
        self,
        buffer_size: int = 3,
        lambda1: float = 0.1,
        lambda2: float = 0.1,
        reference_weighting: str = "uniform",
    ) -> None:
        reference_weights(1, reference_weighting)  # validate the name early
        if lambda1 < 0 or lambda2 < 0:
            raise ValueError(f"lambda1 and lambda2 must be >= 0, got {lambda1}, {lambda2}")
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.reference_weighting = reference_weighting
        self.buffer = ReferenceBuffer(buffer_size)

    def start(self, initial_global: Mapping[str, Any]) -> None:
        if len(self.buffer) == 0:
            self.buffer.push(initial_global)

    def update(self, averaged: Mapping[str, Any], previous_global: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Returns (theta_{r+1}, applied): applied is False during warm-up (plain FedAvg)."""
        if len(self.buffer) == 0:
            self.buffer.push(previous_global)
        applied = self.buffer.is_full
        if applied:
            reference = self.buffer.reference_model(self.reference_weighting)
            new_global = map_step(averaged, previous_global, reference, self.lambda1, self.lambda2)
        else:
            new_global = dict(averaged)
        self.buffer.push(new_global)
        return new_global, applied
