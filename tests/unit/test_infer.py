"""Segmenting a new case: the input's exact grid, FeTS labels, overlay, volumes, and clear errors."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.fets_factory import FETS_SHAPE, save, sri24_affine, write_subject

from fedseg.app.infer import InferenceError, region_volumes, segment
from fedseg.network import FedSegUNet

CONFIG = {"channels": [4, 8], "strides": [2]}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small network with fixed weights, saved as FLARE's persistor saves the global model."""
    torch.manual_seed(0)
    network = FedSegUNet(**CONFIG)
    with torch.no_grad():  # bias the output so that some voxels come out as tumour
        network.unet.model[-1][-1].conv.unit0.conv.bias.copy_(torch.tensor([0.2, 0.4, 0.1]))
    path = tmp_path_factory.mktemp("model") / "FL_global_model.pt"
    torch.save({"model": network.state_dict(), "train_conf": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def full_case(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fets"))
    write_subject(root, "FeTS2022_01341", FETS_SHAPE, seed=0)
    return os.path.join(root, "FeTS2022_01341")


def test_full_size_case_keeps_the_grid_and_gets_fets_labels(full_case, model_file, tmp_path):
    out = tmp_path / "seg.nii.gz"
    result = segment(full_case, model_file, str(out), CONFIG, roi=(64, 64, 64), overlay=str(tmp_path / "o.png"))
    seg = nib.load(str(out))
    source = nib.load(os.path.join(full_case, "FeTS2022_01341_t1.nii.gz"))
    assert seg.shape == FETS_SHAPE
    np.testing.assert_allclose(seg.affine, source.affine)
    np.testing.assert_allclose(seg.affine, sri24_affine())
    assert seg.get_data_dtype() == np.uint8
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4} and (labels > 0).any()
    assert os.path.getsize(tmp_path / "o.png") > 10_000
    # volumes: 1 mm voxels, so millilitres = voxels / 1000
    assert result.volumes_ml["WT"] == pytest.approx((labels > 0).sum() / 1000.0)
    assert result.volumes_ml["ET"] == pytest.approx((labels == 4).sum() / 1000.0)


def test_region_volumes_use_the_voxel_size():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2] = 2
    labels[2:3] = 1
    labels[3:4] = 4
    volumes = region_volumes(labels, np.diag([2.0, 2.0, 2.0, 1.0]))  # 8 mm^3 per voxel
    assert volumes["WT"] == pytest.approx(400 * 8 / 1000)
    assert volumes["TC"] == pytest.approx(200 * 8 / 1000)
    assert volumes["oedema"] == pytest.approx(200 * 8 / 1000)


def test_missing_modality(tmp_path, model_file):
    write_subject(str(tmp_path), "FeTS2022_00007", (16, 16, 16))
    case = tmp_path / "FeTS2022_00007"
    os.remove(case / "FeTS2022_00007_t2.nii.gz")
    with pytest.raises(InferenceError, match="missing modality t2: no file .*FeTS2022_00007_t2.nii.gz"):
        segment(str(case), model_file, str(tmp_path / "s.nii.gz"), CONFIG)
    assert not (tmp_path / "s.nii.gz").exists()


def test_mismatched_shapes(tmp_path, model_file):
    write_subject(str(tmp_path), "FeTS2022_00008", (16, 16, 16))
    case = tmp_path / "FeTS2022_00008"
    save(str(case / "FeTS2022_00008_flair.nii.gz"), np.ones((16, 16, 12), np.int16), sri24_affine((16, 16, 16)))
    with pytest.raises(InferenceError, match=r"flair.nii.gz: shape \(16, 16, 12\) differs from t1 \(16, 16, 16\)"):
        segment(str(case), model_file, str(tmp_path / "s.nii.gz"), CONFIG)


def test_model_that_does_not_fit_the_network(tmp_path, model_file):
    write_subject(str(tmp_path), "FeTS2022_00009", (16, 16, 16))
    with pytest.raises(InferenceError, match="does not fit the network"):
        segment(
            str(tmp_path / "FeTS2022_00009"),
            model_file,
            str(tmp_path / "s.nii.gz"),
            {"channels": [8, 16], "strides": [2]},
        )
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(InferenceError, match="not a readable PyTorch checkpoint"):
        segment(str(tmp_path / "FeTS2022_00009"), str(broken), str(tmp_path / "s.nii.gz"), CONFIG)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch " + os.devnull,))


def test_a_model_file_that_would_run_code_is_refused_unread(tmp_path, model_file):
    write_subject(str(tmp_path), "FeTS2022_00011", (16, 16, 16))
    crafted = tmp_path / "crafted.pt"
    torch.save({"model": {"w": _RunsCode()}}, crafted)
    with pytest.raises(
        InferenceError, match=r"not a readable PyTorch checkpoint \(read weights only; it holds more than weights\)"
    ):
        segment(str(tmp_path / "FeTS2022_00011"), str(crafted), str(tmp_path / "s.nii.gz"), CONFIG)


def test_four_files_in_any_folder(tmp_path, model_file):
    write_subject(str(tmp_path), "FeTS2022_00010", (16, 16, 16))
    files = []
    for modality in ("t1", "t1ce", "t2", "flair"):
        target = tmp_path / f"{modality}.nii.gz"
        shutil.copy(tmp_path / "FeTS2022_00010" / f"FeTS2022_00010_{modality}.nii.gz", target)
        files.append(str(target))
    result = segment(files, model_file, str(tmp_path / "s.nii.gz"), CONFIG, roi=(16, 16, 16))
    assert result.labels.shape == (16, 16, 16)


def test_a_runs_network_and_window_come_from_its_recorded_settings(monkeypatch):
    """The channels and crop come from the run's run.json; a run.json without them (an older run) gets the default
    profile's; the strides always from fedseg.network (the one place that derives them)."""
    from fedseg.app import artifacts
    from fedseg.app.infer import network_settings
    from fedseg.network import network_config, strides_for
    from fedseg.settings import TrainingSettings

    class Run:
        run_info = {"settings": {"channels": [8, 16, 32], "crop": [32, 32, 24], "algorithm": "fedref"}}
        global_model = "FL_global_model.pt"

    monkeypatch.setattr(artifacts, "load_run", lambda folder: Run)
    assert network_settings("run") == ("FL_global_model.pt", {"channels": [8, 16, 32], "strides": [2, 2]}, [32, 32, 24])
    Run.run_info = {"settings": {}}
    default = TrainingSettings()
    assert network_settings("run")[1:] == (network_config(default.channels), list(default.crop))
    Run.run_info = {"settings": {"channels": [8, 0]}}
    with pytest.raises(InferenceError, match=r"^run: training setting channels \[8, 0\]"):
        network_settings("run")
    assert FedSegUNet.from_settings(default).config()["strides"] == strides_for(default.channels) == [2, 2, 2]
