"""Putting one checked subject into a site folder: link, copy or preprocess.

- link: a symlink to the subject's source folder (no copy of the volumes; the default).
- copy: the five files copied as they are (a site folder that can be moved to another machine).
- preprocess: each volume cropped to the brain's bounding box (union of the non-zero voxels of the four
  modalities) and stored compactly (int16 images where the values allow it, else float32; uint8 seg).
  The cropped files keep world coordinates (their affine is shifted by the crop), and the crop is
  recorded so that a prediction on the cropped grid maps back to the original one (``uncrop``).
Each subject is written atomically: a crash leaves the old entry or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np

from fedseg.atomic import atomic_directory
from fedseg.data_prep.checks import KINDS, SubjectCheck
from fedseg.data_prep.layout import SEG, subject_file

MODES = ("link", "copy", "preprocess")
INT16 = np.iinfo(np.int16)


def compact(data: np.ndarray, is_seg: bool) -> np.ndarray:
    """The smallest lossless storage for a volume: uint8 seg; int16 images when integral and in range."""
    if is_seg:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        if data.size and (data.min() < INT16.min or data.max() > INT16.max):
            return data.astype(np.float32)
        return data.astype(np.int16)
    if data.size and np.all(np.mod(data, 1) == 0) and data.min() >= INT16.min and data.max() <= INT16.max:
        return data.astype(np.int16)
    return data.astype(np.float32)


def crop_affine(affine: np.ndarray, start: list[int]) -> np.ndarray:
    """Affine of a crop starting at voxel ``start``: the same world coordinates for the same tissue."""
    shifted = np.array(affine, dtype=float, copy=True)
    shifted[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=float) + affine[:3, 3]
    return shifted


def uncrop(volume: np.ndarray, crop: dict, fill=0) -> np.ndarray:
    """Place a volume on the cropped grid back into the original grid recorded by ``preprocess``."""
    out = np.full(crop["original_shape"], fill, dtype=volume.dtype)
    out[tuple(slice(a, b) for a, b in crop["box"])] = volume
    return out


def _link(source_dir: str, target: str) -> None:
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.link.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(source_dir, tmp)
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    os.replace(tmp, target)


def materialise(data_dir: str, check: SubjectCheck, site_dir: str, mode: str) -> dict | None:
    """Write one subject into ``site_dir`` in ``mode``; returns the crop record (preprocess) or None."""
    sid = check.subject
    target = os.path.join(site_dir, sid)
    if mode == "link":
        _link(os.path.join(data_dir, sid), target)
        return None
    if os.path.islink(target):
        os.remove(target)
    if mode == "copy":
        with atomic_directory(target) as tmp:
            for kind in KINDS:
                shutil.copy2(
                    subject_file(data_dir, sid, kind), os.path.join(tmp, os.path.basename(subject_file("", sid, kind)))
                )
        return None
    if mode != "preprocess":
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    box = check.brain_box
    slices = tuple(slice(a, b) for a, b in box)
    affine = crop_affine(np.asarray(check.affine), [a for a, _ in box])
    with atomic_directory(target) as tmp:
        for kind in KINDS:  # one volume in memory at a time
            image = nib.load(subject_file(data_dir, sid, kind))
            data = compact(np.asarray(image.dataobj)[slices], kind == SEG)
            out = nib.Nifti1Image(data, affine)
            out.set_qform(affine, code=1)
            out.set_sform(affine, code=1)
            out.header.set_xyzt_units("mm")
            nib.save(out, os.path.join(tmp, os.path.basename(subject_file("", sid, kind))))
            del image, data, out
    return {"box": box, "original_shape": check.shape, "original_affine": check.affine}
