"""Reading a saved global model back: FLARE's persistor checkpoint or a plain state dict."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch

from fedseg.network import FedSegUNet


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint written by FLARE's PT persistor (``{"model": ...}``) or by ``torch.save``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several kinds for a damaged file
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__}: {exc})") from exc
    state = saved.get("model", saved) if isinstance(saved, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: holds no model weights")
    return {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for k, v in state.items()}


def load_network(path: str, config: Mapping | None = None) -> FedSegUNet:
    """A ``FedSegUNet`` built from ``config`` (its constructor arguments) with the checkpoint's weights."""
    network = FedSegUNet(**dict(config or {}))
    state = load_state_dict(path)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        reason = first[1].strip() if len(first) > 1 else first[0]
        raise ValueError(f"{path}: does not fit the network {network.config()} ({reason[:200]})") from exc
    return network.eval()
