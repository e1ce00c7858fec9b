"""The real-data path at FeTS2022's real size: a FLARE federation on 240x240x155 subjects with the fets2022 profile.

Two sites of three full-size synthetic subjects (two training, one validation), ``fedseg simulate --profile
fets2022`` as the README writes it with one round of two local steps, then ``fedseg infer`` on a full-size case. Checked: the round record, the sites'
disk caches, the saved model, and a segmentation in the input's exact grid.
"""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from fedseg.app.artifacts import load_run
from fedseg.cache import CACHE_SUFFIX, cache_size_bytes
from fedseg.checkpoint import load_network
from fedseg.data_prep.fets2022 import prepare_sites
from fedseg.data_prep.synthetic import Institution, SyntheticConfig, generate
from fedseg.jobs.recipes import SIMULATOR_CACHE_NAME, JobSettings
from fedseg.settings import profile

FULL_SHAPE = (240, 240, 155)
STEPS = 2


@pytest.fixture(scope="module")
def full_size_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_size")
    config = SyntheticConfig(shape=FULL_SHAPE, seed=3, institutions=[Institution(subjects=3), Institution(subjects=3)])
    source = generate(str(root / "data"), config)
    prepare_sites(source, str(root / "sites"), partitions=[1, 2], validation_fraction=0.34)
    # the README's command, with one round of two steps and one thread per site (two sites share this CPU)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedseg.app",
            "simulate",
            "--profile",
            "fets2022",
            "--data-root",
            str(root / "sites"),
            "--sites",
            "site-1",
            "site-2",
            "--rounds",
            "1",
            "--local-steps",
            str(STEPS),
            "--threads",
            "1",
            "--no-cross-site-eval",
            "--workspace",
            str(root / "workspace"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = str(root / "workspace" / "fedseg_fedref")
    settings = JobSettings.for_profile("fets2022", sites=["site-1", "site-2"], local_steps=STEPS)
    return settings, folder, root, source


def test_round_record_of_a_full_size_federation(full_size_run):
    settings, folder, root, _ = full_size_run
    run = load_run(folder)
    assert len(run.rounds) == 1 and sorted(run.rounds[0]["sites"]) == ["site-1", "site-2"]
    assert run.run_info["settings"]["profile"] == "fets2022"
    assert run.run_info["settings"]["crop"] == list(profile("fets2022").crop)
    for site, record in run.rounds[0]["sites"].items():
        assert record["num_steps"] == STEPS, site  # the profile's bounded local work, cut to 2 here
        assert record["n_train_cases"] == 2 and record["n_cases"] == 1
        assert 0.0 <= record["dice_mean"] <= 1.0 and np.isfinite(record["train_loss"])
        # every case cached once in the site's cache, compactly (cropped float16: well under 162 MiB a case)
        cache = root / "workspace" / SIMULATOR_CACHE_NAME / site
        assert len([n for n in os.listdir(cache) if n.endswith(CACHE_SUFFIX)]) == 3
        assert 0 < cache_size_bytes(str(cache)) / 1e6 < 3 * 80
        assert "cache_mb" not in record  # the cache's size sums the brain volumes: it stays on the site


def test_saved_model_has_the_profile_network(full_size_run):
    settings, folder, _, _ = full_size_run
    network = load_network(load_run(folder).global_model, settings.network().config())
    assert network.channels == list(profile("fets2022").channels)


def test_infer_writes_a_segmentation_in_the_input_grid(full_size_run, tmp_path):
    _, folder, _, source = full_size_run
    case = os.path.join(source, sorted(n for n in os.listdir(source) if n.startswith("FeTS"))[0])
    out = tmp_path / "seg.nii.gz"
    done = subprocess.run(
        [sys.executable, "-m", "fedseg.app", "infer", case, "--run", folder, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    seg = nib.load(out)
    flair = nib.load(os.path.join(case, f"{os.path.basename(case)}_flair.nii.gz"))
    assert seg.shape == FULL_SHAPE == flair.shape
    np.testing.assert_allclose(seg.affine, flair.affine, atol=1e-6)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 4}
