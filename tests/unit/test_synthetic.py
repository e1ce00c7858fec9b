"""Synthetic data in the exact FeTS2022 layout, read back with nibabel as any FeTS tool would."""

from __future__ import annotations

import csv
import os

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from conftest import TINY_SHAPE, tiny_config
from fedseg.data_prep.layout import MODALITIES, TRAINING_FOLDER
from fedseg.data_prep.synthetic import generate


def subjects(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def test_layout_and_partitioning_csv(tiny_fets):
    assert os.path.basename(tiny_fets) == TRAINING_FOLDER
    sids = subjects(tiny_fets)
    assert sids == [f"FeTS2022_{n:05d}" for n in range(1, 11)]
    for sid in sids:
        assert sorted(os.listdir(os.path.join(tiny_fets, sid))) == sorted(
            f"{sid}_{k}.nii.gz" for k in (*MODALITIES, "seg")
        )
    with open(os.path.join(tiny_fets, "partitioning_1.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Partition_ID", "Subject_ID"]
    assert [r[0] for r in rows[1:]] == ["1"] * 4 + ["2"] * 3 + ["3"] * 3
    assert [r[1] for r in rows[1:]] == sids


def test_volumes_read_back_with_nibabel_and_simpleitk(tiny_fets):
    sid = "FeTS2022_00001"
    images = {k: nib.load(os.path.join(tiny_fets, sid, f"{sid}_{k}.nii.gz")) for k in (*MODALITIES, "seg")}
    affine = images["seg"].affine
    assert affine[0, 0] < 0 and affine[1, 1] < 0 and affine[2, 2] > 0  # FeTS/SRI24 LPS stored in NIfTI
    for kind, image in images.items():
        assert image.shape == TINY_SHAPE
        np.testing.assert_allclose(image.affine, affine)
        assert image.get_data_dtype() == (np.uint8 if kind == "seg" else np.int16)
    seg = np.asarray(images["seg"].dataobj)
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    itk = sitk.ReadImage(os.path.join(tiny_fets, sid, f"{sid}_t1.nii.gz"))
    assert itk.GetSize() == TINY_SHAPE
    np.testing.assert_allclose(itk.GetSpacing(), np.abs(np.diag(affine)[:3]))


def test_tumour_is_nested_and_modalities_have_distinct_contrast(tiny_fets):
    cores = 0
    for sid in subjects(tiny_fets):
        seg = np.asarray(nib.load(os.path.join(tiny_fets, sid, f"{sid}_seg.nii.gz")).dataobj)
        assert (seg == 2).any() and (seg == 4).any(), sid
        volumes = [
            np.asarray(nib.load(os.path.join(tiny_fets, sid, f"{sid}_{m}.nii.gz")).dataobj, dtype=float)
            for m in MODALITIES
        ]
        brain = volumes[0] > 0
        assert not (seg[~brain]).any(), sid  # tumour only inside the brain
        core = np.isin(seg, (1, 4))
        # oedema surrounds the core: growing the core by one voxel (within the brain) stays in the tumour
        grown = ndimage.binary_dilation(core) & ~core & brain
        assert np.mean(seg[grown] != 0) > 0.9, sid
        necrotic = seg == 1
        if necrotic.any():  # the necrotic core lies mostly within the enhancing rim
            rim = ndimage.binary_dilation(necrotic) & ~necrotic & brain
            assert np.mean(seg[rim] == 4) > 0.6, sid
        cores += int(necrotic.any())
        tumour_vs_brain = [v[seg == 4].mean() / v[brain & (seg == 0)].mean() for v in volumes]
        assert max(tumour_vs_brain) - min(tumour_vs_brain) > 0.3, sid  # ET is bright in t1ce, not in t1
    assert cores >= 5


def test_institutions_differ(tiny_fets):
    means = []
    for sid in ("FeTS2022_00001", "FeTS2022_00005", "FeTS2022_00008"):  # one per institution
        t1 = np.asarray(nib.load(os.path.join(tiny_fets, sid, f"{sid}_t1.nii.gz")).dataobj, dtype=float)
        means.append(t1[t1 > 0].mean())
    assert means[1] < 0.6 * means[0] < means[2] * 0.6  # scales 400 < 1000 < 2500


def test_deterministic_from_seed(tmp_path, tiny_fets):
    config = tiny_config()
    config.institutions = config.institutions[:1]
    again = generate(str(tmp_path / "again"), config)
    other = generate(
        str(tmp_path / "other"),
        tiny_config(seed=1).__class__(shape=config.shape, seed=1, institutions=config.institutions),
    )
    sid = "FeTS2022_00002"

    def read(root):
        return np.asarray(nib.load(os.path.join(root, sid, f"{sid}_flair.nii.gz")).dataobj)

    np.testing.assert_array_equal(read(again), read(tiny_fets))
    assert not np.array_equal(read(other), read(tiny_fets))


def test_regenerating_the_same_config_leaves_files_untouched(tmp_path):
    config = tiny_config()
    config.institutions = config.institutions[:1]
    folder = generate(str(tmp_path), config)
    path = os.path.join(folder, "FeTS2022_00001", "FeTS2022_00001_seg.nii.gz")
    before = os.stat(path).st_mtime_ns
    assert generate(str(tmp_path), config) == folder
    assert os.stat(path).st_mtime_ns == before
