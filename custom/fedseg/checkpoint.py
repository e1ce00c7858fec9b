"""Reading saved models and server state back, weights only, and finding the checkpoints of a run to continue.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint is data, and unpickling anything else
would run code. What the server writes is therefore tensors, numbers, strings and containers only
(``to_tensors`` turns the numpy arrays FLARE hands the server into tensors before saving; ``to_arrays`` turns
them back).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import numpy as np
import torch

from fedseg.network import FedSegUNet

GLOBAL_MODEL_FILE = "FL_global_model.pt"  # FLARE's name for the persistor's global model (DefaultCheckpointFileName)
REFERENCE_BUFFER_FILE = "fedref_reference_buffer.pt"
ROUND_METRICS_FILE = "round_metrics.jsonl"  # the server's round records (fedseg.controller writes them)
RESUMED_FROM_DIR = "resumed_from"  # in a continued run's folder: <job id>/ of each run it continued


def to_tensors(value):
    """``value`` with every numpy array (or numpy scalar) inside it as a torch tensor, for a weights-only file."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return torch.as_tensor(value)
    if isinstance(value, Mapping):
        return {k: to_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_tensors(v) for v in value)
    return value


def to_arrays(value):
    """The inverse of ``to_tensors``: tensors back to numpy arrays, the form FLARE's server model params take."""
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    if isinstance(value, Mapping):
        return {k: to_arrays(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_arrays(v) for v in value)
    return value


def load_file(path: str):
    """A file's content, weights only; one-line errors for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a damaged or non-weights file
        # not torch's own text: it suggests turning the weights-only guard off, which is what must never happen
        kind = "it holds more than weights" if isinstance(exc, pickle.UnpicklingError) else exc.__class__.__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (read weights only; {kind})") from exc


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint written by FLARE's PT persistor (``{"model": ...}``) or by ``torch.save``."""
    saved = load_file(path)
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


def _found(root: str, name: str) -> list[str]:
    """Regular files called ``name`` below ``root`` that really lie inside it (no symbolic link followed)."""
    real_root = os.path.realpath(root)
    hits = []
    for folder, _dirs, files in os.walk(root, followlinks=False):
        if name in files:
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if not os.path.islink(path) and os.path.isfile(real) and os.path.commonpath([real_root, real]) == real_root:
                hits.append(os.path.abspath(path))
    return hits


def round_records(folder: str) -> list[str]:
    """The round record files below a run folder, shortest path first: the run's own, then the copies of the runs
    it continued (under ``resumed_from/``), as the report finds them (``fedseg.app.artifacts``)."""
    return sorted(_found(folder, ROUND_METRICS_FILE), key=len)


def part_job(relative: str) -> str | None:
    """The job id of an earlier part's round records, ``.../resumed_from/<job id>/round_metrics.jsonl`` (a path
    relative to the run folder), else None (the run's own file, or another one of that name, e.g. FLARE's
    ``metrics/round_metrics.jsonl``)."""
    parts = os.path.normpath(relative).split(os.sep)
    if len(parts) >= 3 and parts[-1] == ROUND_METRICS_FILE and parts[-3] == RESUMED_FROM_DIR:
        return parts[-2]
    return None


def find_resume_files(folder: str) -> tuple[str, str]:
    """(global model, reference buffer) of a stopped run: the newest buffer below ``folder`` and the global model
    saved in the same step, the one under the buffer's folder (else the newest)."""
    buffers = _found(folder, REFERENCE_BUFFER_FILE)
    if not buffers:
        raise FileNotFoundError(f"{folder}: no {REFERENCE_BUFFER_FILE} to resume from")
    buffer = max(buffers, key=os.path.getmtime)
    models = _found(folder, GLOBAL_MODEL_FILE)
    if not models:
        raise FileNotFoundError(f"{folder}: no {GLOBAL_MODEL_FILE} to resume from")
    near = [m for m in models if m.startswith(os.path.dirname(buffer) + os.sep)]
    return (min(near, key=len) if near else max(models, key=os.path.getmtime)), buffer


def unpack_stored_run(workspace_zip: bytes, out_dir: str) -> str:
    """The checkpoint files and round records of a finished job's saved server workspace (FLARE zips it into its
    job store), written under ``out_dir`` with their folders and times kept (the newest buffer is the one to
    resume from, also when the job was itself a continuation); nothing else of the archive is unpacked. Returns
    ``out_dir``.

    Member names are the server's own, but are still checked: none may leave ``out_dir``.
    """
    import io
    import time
    import zipfile

    wanted = (REFERENCE_BUFFER_FILE, GLOBAL_MODEL_FILE, ROUND_METRICS_FILE)
    root = os.path.realpath(out_dir)
    with zipfile.ZipFile(io.BytesIO(workspace_zip)) as archive:
        for member in archive.infolist():
            if member.is_dir() or os.path.basename(member.filename) not in wanted:
                continue
            target = os.path.realpath(os.path.join(root, member.filename))
            if os.path.isabs(member.filename) or os.path.commonpath([root, target]) != root:
                raise ValueError(f"stored workspace: member {member.filename!r} would leave {out_dir}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as f:
                f.write(source.read())
            written = time.mktime((*member.date_time, 0, 0, -1))
            os.utime(target, (written, written))
    return out_dir


def buffer_round(path: str) -> int:
    """The round a saved reference buffer belongs to."""
    saved = load_file(path)
    value = saved.get("round") if isinstance(saved, Mapping) else None
    value = int(value) if torch.is_tensor(value) or isinstance(value, (int, np.integer)) else None
    if value is None or value < 0:
        raise ValueError(f"{path}: a reference buffer without its round")
    return value
