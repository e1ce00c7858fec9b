"""Every check a FeTS2022 subject must pass before it is prepared, one file at a time in bounded memory.

A subject passes when its five files exist and decode completely, the four modalities and the seg share
shape and affine, the seg holds only labels {0, 1, 2, 4}, the images hold only finite values, and no
modality is empty. Each failure is one ``Problem`` naming the file and the reason. Reading the files is
the expensive part; ``signature`` (size and mtime of each file) lets a later run skip unchanged subjects.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import nibabel as nib
import numpy as np

from fedseg.data_prep.layout import MODALITIES, SEG, subject_file
from fedseg.regions import VALID_LABELS

KINDS = (*MODALITIES, SEG)
AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class Problem:
    subject: str
    file: str
    kind: str  # short category, for counting: missing, unreadable, geometry, labels, non-finite, empty
    reason: str

    def line(self) -> str:
        return f"{self.subject}: {self.file or '-'}: {self.reason}"


@dataclass
class SubjectCheck:
    """What reading a subject found: its problems, geometry and brain bounding box (for cropping)."""

    subject: str
    signature: list
    problems: list[Problem] = field(default_factory=list)
    shape: list[int] | None = None
    affine: list[list[float]] | None = None
    dtypes: dict[str, str] = field(default_factory=dict)
    brain_box: list[list[int]] | None = None  # [[start, stop] per axis] of the union of nonzero voxels

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SubjectCheck:
        data = dict(data)
        data["problems"] = [Problem(**p) for p in data.get("problems", [])]
        return cls(**data)


def signature(folder: str, sid: str) -> list:
    """(file name, size, mtime_ns) of each expected file; None for a missing one."""
    out = []
    for kind in KINDS:
        path = subject_file(folder, sid, kind)
        try:
            st = os.stat(path)
            out.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([os.path.basename(path), None, None])
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text}"[:200] if text else exc.__class__.__name__


def check_subject(folder: str, sid: str) -> SubjectCheck:
    """Read and check one subject of a FeTS2022 training folder (``folder/sid/sid_<kind>.nii.gz``).

    The first volume of the right dimension is the reference the others' shape and affine must match; the brain
    box is the union of the modalities' nonzero voxels, kept only when the subject has no problem.
    """
    result = SubjectCheck(sid, signature(folder, sid))
    if not os.path.isdir(os.path.join(folder, sid)):
        result.problems.append(Problem(sid, "", "missing", f"no subject folder {sid} in {folder}"))
        return result
    reference: tuple[str, tuple, np.ndarray] | None = None
    box: tuple[np.ndarray, np.ndarray] | None = None
    for kind in KINDS:
        path = subject_file(folder, sid, kind)
        name = os.path.basename(path)
        loaded = _load(sid, path)
        if isinstance(loaded, Problem):
            result.problems.append(loaded)
            continue
        image, data = loaded
        result.dtypes[kind] = str(image.get_data_dtype())
        problem = _geometry_problem(sid, name, data, image.affine, reference)
        if problem is None and reference is None:
            reference = (name, data.shape, image.affine)
            result.shape, result.affine = list(data.shape), image.affine.tolist()
        problem = problem or _content_problem(sid, name, kind, data)
        if problem is not None:
            result.problems.append(problem)
        elif kind != SEG:
            box = _union(box, _nonzero_box(data))
        del loaded, image, data  # one volume in memory at a time
    if box is not None and not result.problems:
        result.brain_box = [[int(a), int(b)] for a, b in zip(*box)]
    return result


def _load(sid: str, path: str) -> tuple[nib.spatialimages.SpatialImage, np.ndarray] | Problem:
    """The image and its fully decoded data, or the problem (missing, unreadable)."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        return Problem(sid, name, "missing", "file missing")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)  # decodes the whole file: a truncated .gz fails here
    except Exception as exc:  # nibabel, gzip and zlib raise many kinds for a damaged file
        return Problem(sid, name, "unreadable", f"unreadable ({_short(exc)})")
    return image, data


def _geometry_problem(
    sid: str, name: str, data: np.ndarray, affine: np.ndarray, reference: tuple[str, tuple, np.ndarray] | None
) -> Problem | None:
    """A volume that is not 3D, or whose shape or affine differs from the reference volume's."""
    if data.ndim != 3:
        return Problem(sid, name, "geometry", f"expected a 3D volume, found shape {data.shape}")
    if reference is None:
        return None
    ref_name, ref_shape, ref_affine = reference
    if data.shape != ref_shape:
        return Problem(sid, name, "geometry", f"shape {data.shape} differs from {ref_name} {ref_shape}")
    gap = float(np.max(np.abs(affine - ref_affine)))
    if gap > AFFINE_TOLERANCE_MM:
        return Problem(sid, name, "geometry", f"affine differs from {ref_name} by up to {gap:.4g} mm")
    return None


def _content_problem(sid: str, name: str, kind: str, data: np.ndarray) -> Problem | None:
    """Non-finite voxels; in the seg, labels outside {0, 1, 2, 4}; in a modality, no nonzero voxel."""
    finite = np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else None
    if finite is not None and not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        return Problem(sid, name, "non-finite", f"{bad} non-finite voxels (NaN or Inf)")
    if kind == SEG:
        wrong = [v.item() for v in np.unique(data) if v not in VALID_LABELS]
        if wrong:
            shown = ", ".join(f"{v:g}" for v in wrong[:6]) + (" ..." if len(wrong) > 6 else "")
            return Problem(sid, name, "labels", f"labels {shown} not in {{0, 1, 2, 4}}")
        return None
    if not (data != 0).any():
        return Problem(sid, name, "empty", "image is empty (every voxel is 0): no brain")
    return None


def _nonzero_box(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) per axis of the volume's nonzero voxels (there is at least one)."""
    nonzero = data != 0
    coords = [np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return np.array([c[0] for c in coords]), np.array([c[-1] + 1 for c in coords])


def _union(
    box: tuple[np.ndarray, np.ndarray] | None, other: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    if box is None:
        return other
    return np.minimum(box[0], other[0]), np.maximum(box[1], other[1])
