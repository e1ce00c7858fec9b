"""Synthetic FeTS2022-shaped data: brain MRI with tumours, in the exact FeTS folder layout.

Anatomy comes from the MNI152 (ICBM 2009a) T1 and grey/white-matter templates that nilearn's wheel
ships, read offline from the installed package. Each subject gets a random affine deformation of that
brain, a tumour (necrotic core 1 inside an enhancing rim 4 inside oedema 2) and four modalities with
distinct tissue contrasts. Institutions differ in intensity scale, bias field, noise, tumour size and
number of subjects, so that the sites of a federation are non-IID. Everything is deterministic from a seed.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage

from fedseg.atomic import atomic_directory, write_json
from fedseg.data_prep.layout import MODALITIES, PARTITION_HEADER, TRAINING_FOLDER, subject_file, subject_id

# Mean intensity of each tissue per modality (arbitrary units, before the institution's scale).
# Columns: CSF, grey matter, white matter, oedema, enhancing tumour, necrotic core.
TISSUE_CONTRAST = {
    "t1": (0.25, 0.60, 0.85, 0.50, 0.60, 0.30),
    "t1ce": (0.25, 0.60, 0.85, 0.55, 1.35, 0.22),
    "t2": (1.00, 0.60, 0.40, 0.90, 0.70, 1.05),
    "flair": (0.15, 0.65, 0.50, 1.10, 0.85, 0.55),
}


@dataclass
class Institution:
    """How one contributing institution's scans differ from the others'."""

    subjects: int
    intensity_scale: float = 1000.0
    bias_strength: float = 0.15
    noise: float = 0.03
    tumour_radius_mm: tuple[float, float] = (18.0, 30.0)


@dataclass
class SyntheticConfig:
    shape: tuple[int, int, int] = (64, 64, 48)
    seed: int = 0
    institutions: list[Institution] = field(
        default_factory=lambda: [
            Institution(subjects=14, intensity_scale=1000.0, bias_strength=0.10, noise=0.03, tumour_radius_mm=(20, 32)),
            Institution(subjects=10, intensity_scale=400.0, bias_strength=0.25, noise=0.05, tumour_radius_mm=(16, 26)),
            Institution(subjects=8, intensity_scale=2500.0, bias_strength=0.15, noise=0.04, tumour_radius_mm=(24, 36)),
        ]
    )
    first_subject: int = 1

    def to_json(self) -> dict:
        return asdict(self)


def template_folder() -> str:
    """Folder of the MNI152 templates inside the installed nilearn package (nilearn is not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nilearn is not installed: it ships the MNI152 templates the synthetic data use")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


@lru_cache(maxsize=4)
def brain_templates(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Tissue probability maps (3, X, Y, Z) for CSF, GM, WM at ``shape``, brain mask, and voxel size in mm.

    The MNI brain is cropped to its bounding box and scaled uniformly so that it fills about 90% of the
    volume, at no less than 1 mm per voxel (so 240x240x155 gives FeTS's 1 mm grid).
    """
    folder = template_folder()
    names = ("gm", "wm")
    maps = [
        nib.load(os.path.join(folder, f"mni_icbm152_{n}_tal_nlin_sym_09a_converted.nii.gz")).get_fdata(dtype=np.float32)
        / 255.0
        for n in names
    ]
    gm, wm = maps
    brain = ndimage.binary_fill_holes(ndimage.binary_closing((gm + wm) > 0.2, iterations=3))
    brain = ndimage.binary_dilation(brain, iterations=1)
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    box = tuple(slice(a, b + 1) for a, b in zip(np.argwhere(brain).min(0), np.argwhere(brain).max(0)))
    extent = np.array([s.stop - s.start for s in box], dtype=float)
    spacing = max(1.0, float(np.max(extent / (0.9 * np.array(shape)))))
    tissues = []
    for tissue in (csf, gm, wm):
        small = ndimage.zoom(tissue[box], 1.0 / spacing, order=1)
        canvas = np.zeros(shape, dtype=np.float32)
        offset = [(n - s) // 2 for n, s in zip(shape, small.shape)]
        region = tuple(slice(max(o, 0), max(o, 0) + min(s, n)) for o, s, n in zip(offset, small.shape, shape))
        src = tuple(slice(max(-o, 0), max(-o, 0) + (r.stop - r.start)) for o, r in zip(offset, region))
        canvas[region] = small[src]
        tissues.append(canvas)
    stack = np.clip(np.stack(tissues), 0.0, 1.0)
    return stack, stack.sum(0) > 0.5, spacing


def fets_affine(shape: tuple[int, int, int], spacing: float) -> np.ndarray:
    """The FeTS/SRI24 convention: LPS axes stored as a NIfTI affine with flipped x and y."""
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[1, 3] = (shape[1] - 1) * spacing
    return affine


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], scale: int = 4) -> np.ndarray:
    """A smooth random field in [-1, 1] (for bias fields and irregular tumour borders)."""
    coarse = rng.standard_normal([max(2, n // max(1, n // scale)) for n in shape]).astype(np.float32)
    field_ = _cubic_upsample(coarse, shape)
    return field_ / (np.abs(field_).max() + 1e-6)


def _cubic_upsample(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``ndimage.zoom(coarse, order=3)`` to ``shape``, one axis at a time.

    Spline interpolation is separable, so zooming an identity matrix along one axis gives that axis's
    interpolation matrix, and three small matrix products give the same field (equal at the demo's size,
    within 1e-11 at 240x240x155) in a fraction of a second instead of about 10 s per field at full size.
    """
    out = coarse.astype(np.float64)
    for axis, (n, c) in enumerate(zip(shape, coarse.shape)):
        weights = ndimage.zoom(np.eye(c), (n / c, 1.0), order=3)[:n]
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    return out.astype(np.float32)


def _deform(rng: np.random.Generator, volume: np.ndarray) -> np.ndarray:
    """Random small rotation and anisotropic scaling about the centre, applied to each channel."""
    angles = np.deg2rad(rng.uniform(-6, 6, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    matrix = rot @ np.diag(1.0 / rng.uniform(0.92, 1.08, size=3))
    centre = (np.array(volume.shape[1:]) - 1) / 2.0
    offset = centre - matrix @ centre
    return np.stack([ndimage.affine_transform(c, matrix, offset=offset, order=1) for c in volume])


def _tumour(rng: np.random.Generator, brain: np.ndarray, spacing: float, radius_mm: tuple[float, float]) -> np.ndarray:
    """A label map with oedema (2) around an enhancing rim (4) around a necrotic core (1), inside the brain."""
    shape = brain.shape
    inner = ndimage.binary_erosion(brain, iterations=max(2, int(round(12.0 / spacing))))
    candidates = np.argwhere(inner if inner.any() else brain)
    centre = candidates[rng.integers(len(candidates))]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float32)
    axes = rng.uniform(0.75, 1.25, size=3)
    distance = np.sqrt(sum(((grid[i] - centre[i]) * spacing / axes[i]) ** 2 for i in range(3)))
    border = 1.0 + 0.25 * _smooth_field(rng, shape, scale=3)
    r_wt = rng.uniform(*radius_mm)
    r_tc = r_wt * rng.uniform(0.45, 0.65)
    r_nc = r_tc * rng.uniform(0.35, 0.6)
    label = np.zeros(shape, dtype=np.uint8)
    label[distance < r_wt * border] = 2
    label[distance < r_tc * border] = 4
    if rng.random() < 0.85:  # most tumours have a necrotic core
        label[distance < r_nc * border] = 1
    label[~brain] = 0
    return label


def make_subject(
    rng: np.random.Generator, shape: tuple[int, int, int], institution: Institution
) -> dict[str, np.ndarray]:
    """The four modalities (int16, as scanners export) and the segmentation (uint8) of one subject."""
    templates, _, spacing = brain_templates(tuple(shape))
    tissues = _deform(rng, templates)
    brain = tissues.sum(0) > 0.5
    label = _tumour(rng, brain, spacing, institution.tumour_radius_mm)
    # Tumour tissue replaces normal tissue where it grows (partial volume at the border through smoothing).
    lesion = np.stack([label == 2, label == 4, label == 1]).astype(np.float32)
    lesion = np.stack([ndimage.gaussian_filter(c, 0.6) for c in lesion])
    normal = tissues * np.clip(1.0 - lesion.sum(0), 0.0, 1.0)
    fractions = np.concatenate([normal, lesion])
    bias = 1.0 + institution.bias_strength * _smooth_field(rng, shape, scale=2)
    images = {}
    for modality in MODALITIES:
        contrast = np.asarray(TISSUE_CONTRAST[modality], dtype=np.float32) * rng.uniform(0.95, 1.05, size=6)
        signal = np.tensordot(contrast, fractions, axes=1)
        texture = 1.0 + 0.04 * _smooth_field(rng, shape, scale=8)
        noisy = signal * bias * texture + rng.normal(0.0, institution.noise, size=shape)
        noisy[~brain] = 0.0
        images[modality] = np.clip(noisy * institution.intensity_scale, 0, 32767).astype(np.int16)
    images["seg"] = label
    return images


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def generate(out_dir: str, config: SyntheticConfig, progress=None) -> str:
    """Write a FeTS2022-layout folder (``MICCAI_FeTS2022_TrainingData``) under ``out_dir``; returns its path.

    The folder is built aside and moved into place at the end, so an interrupted run leaves nothing half
    written. A folder already generated with the same configuration is left as it is.
    """
    target = os.path.join(out_dir, TRAINING_FOLDER)
    manifest_path = os.path.join(target, "synthetic.json")
    if os.path.isfile(manifest_path):
        import json

        with open(manifest_path, encoding="utf-8") as f:
            if json.load(f).get("config") == json.loads(json.dumps(config.to_json())):
                return target
    _, _, spacing = brain_templates(tuple(config.shape))
    affine = fets_affine(tuple(config.shape), spacing)
    total = sum(i.subjects for i in config.institutions)
    with atomic_directory(target) as tmp:
        rows = []
        number = config.first_subject
        for partition, institution in enumerate(config.institutions, start=1):
            for _ in range(institution.subjects):
                sid = subject_id(number)
                rng = np.random.default_rng([config.seed, number])
                subject = make_subject(rng, tuple(config.shape), institution)
                os.makedirs(os.path.join(tmp, sid))
                for kind, data in subject.items():
                    write_nifti(os.path.join(tmp, sid, os.path.basename(subject_file("", sid, kind))), data, affine)
                rows.append((partition, sid))
                number += 1
                if progress:
                    progress(len(rows), total, sid)
        with open(os.path.join(tmp, "partitioning_1.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(PARTITION_HEADER)
            writer.writerows(rows)
        write_json(os.path.join(tmp, "synthetic.json"), {"config": config.to_json(), "spacing_mm": spacing})
    return target
