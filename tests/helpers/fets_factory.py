"""Synthetic subjects in the exact FeTS2022 layout, for the data-preparation tests.

Real subject ids (from the official CSVs), the real geometry (240x240x155 at 1 mm with the SRI24 LPS
affine as FeTS stores it) where the format matters, tiny grids where only the layout does, and the dtypes
found in the wild (int16/float32/float64 images; uint8/float seg).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil

import nibabel as nib
import numpy as np

from fedseg.data_prep.layout import MODALITIES, PARTITION_HEADER, subject_file

FETS_SHAPE = (240, 240, 155)
KINDS = (*MODALITIES, "seg")


def sri24_affine(shape=FETS_SHAPE) -> np.ndarray:
    """FeTS/BraTS NIfTI affine: 1 mm, x and y flipped (LPS), origin at the far y edge."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = shape[1] - 1
    return affine


def volumes(shape, rng: np.random.Generator, image_dtype=np.int16, seg_dtype=np.uint8) -> dict[str, np.ndarray]:
    """A box-shaped 'brain' with a nested tumour; distinct intensity per modality."""
    brain = np.zeros(shape, dtype=bool)
    lo = [max(1, n // 6) for n in shape]
    hi = [n - max(1, n // 6) for n in shape]
    brain[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    centre = [(a + b) // 2 for a, b in zip(lo, hi)]
    grid = np.indices(shape)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    radius = max(1.0, min(b - a for a, b in zip(lo, hi)) / 3)
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(dist < radius) & brain] = 2
    seg[(dist < radius * 0.6) & brain] = 4
    seg[(dist < radius * 0.3) & brain] = 1
    out = {}
    for i, modality in enumerate(MODALITIES):
        values = (200 + 100 * i + rng.integers(0, 50, size=shape)) * brain + 150 * (seg == 4) * (modality == "t1ce")
        out[modality] = values.astype(image_dtype)
    out["seg"] = seg.astype(seg_dtype)
    return out


def save(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)


def write_subject(
    root: str,
    sid: str,
    shape=(6, 6, 5),
    seed: int = 0,
    affine=None,
    image_dtype=np.int16,
    seg_dtype=np.uint8,
    data: dict | None = None,
) -> None:
    os.makedirs(os.path.join(root, sid), exist_ok=True)
    affine = sri24_affine(shape) if affine is None else affine
    data = data or volumes(shape, np.random.default_rng(seed), image_dtype, seg_dtype)
    for kind in KINDS:
        save(subject_file(root, sid, kind), data[kind], affine)


def write_csv(path: str, rows: list[tuple]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PARTITION_HEADER)
        writer.writerows(rows)


def read_csv(path: str) -> list[tuple[int, str]]:
    with open(path, newline="") as f:
        return [(int(r[0]), r[1]) for r in list(csv.reader(f))[1:]]


def build_from_csv(root: str, csv_path: str, shape=(6, 6, 5)) -> list[tuple[int, str]]:
    """A training folder holding every subject of an official CSV (tiny volumes), the CSV copied in."""
    rows = read_csv(csv_path)
    template = volumes(shape, np.random.default_rng(0))
    for _, sid in rows:
        write_subject(root, sid, shape, data=template)
    shutil.copy(csv_path, os.path.join(root, "partitioning_1.csv"))
    return rows


def tree_digest(root: str) -> dict[str, str]:
    """Checksum of every file and link under a folder (to prove a source tree unchanged)."""
    digest = {}
    for folder, dirs, files in os.walk(root):
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                digest[rel] = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as f:
                    digest[rel] = hashlib.sha256(f.read()).hexdigest() + f":{os.stat(path).st_mtime_ns}"
    return digest
