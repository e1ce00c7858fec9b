"""The README's bundle commands on a real tiny federation: `fedseg export-bundle`, then MONAI's own command line
runs the bundle (`python -m monai.bundle run`, and MONAI's network check `verify_net_in_out`) on a FeTS-layout
case. The segmentation is `fedseg infer`'s voxel for voxel, nothing in MONAI's run imports fedseg or NVFlare, and
the model card's numbers are the run's cross-site evaluation."""

from __future__ import annotations

import json
import os
import re
import subprocess

import nibabel as nib
import numpy as np
import pytest
from helpers.commands import VENV, fedseg, ok

from fedseg.app.bundle import METADATA_FILE, export_bundle
from fedseg.app.report import SCORE_KEYS

IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)\s*$")


def python(*args: str, cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``.venv/bin/python <args>`` in ``cwd``; stdout and stderr apart."""
    return subprocess.run(
        [os.path.join(VENV, "bin", "python"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def exported(federation, tiny_fets, two_sites, tmp_path_factory):
    """The README's `fedseg export-bundle` on the 2-site Scaffold run with cross-site evaluation (the run
    tests/integration/test_algorithms.py reads too: one simulation per session), and a validation case of site-1
    in the FeTS layout."""
    _, run = federation(algorithm="scaffold", cross_site_eval=True, num_rounds=2)
    cwd = str(tmp_path_factory.mktemp("clinician"))
    printed = ok(fedseg("export-bundle", run.folder, "--out", "fedseg_bundle", cwd=cwd))
    with open(os.path.join(two_sites, "site-1", "datalist.json"), encoding="utf-8") as f:
        subject = json.load(f)["validation"][0]["subject"]
    return run, cwd, printed, os.path.join(tiny_fets, subject)


def test_monai_runs_the_bundle_and_its_segmentation_is_fedseg_infers(exported):
    run, cwd, printed, case = exported
    assert printed.startswith(f"bundle: {os.path.join(cwd, 'fedseg_bundle')}\n")
    assert "model: the final global model of fedseg_scaffold (scaffold" in printed
    done = python(
        *("-m", "monai.bundle", "run", "--config_file", "fedseg_bundle/configs/inference.json"),
        *("--bundle_root", "fedseg_bundle", "--dataset_dir", case, "--output_dir", "seg"),
        cwd=cwd,
        env={"PYTHONPROFILEIMPORTTIME": "1"},  # every module the run imports, on stderr
    )
    assert done.returncode == 0, done.stderr[-4000:]
    imported = {m.group(1) for m in map(IMPORTED.match, done.stderr.splitlines()) if m}
    assert "monai.bundle" in imported and "nibabel" in imported
    assert not {m for m in imported if m.split(".")[0] in ("fedseg", "nvflare")}
    subject = os.path.basename(case)
    ok(fedseg("infer", case, "--run", run.folder, "--out", "ours.nii.gz", cwd=cwd))
    theirs, ours = (
        nib.load(os.path.join(cwd, "seg", f"{subject}_seg.nii.gz")),
        nib.load(os.path.join(cwd, "ours.nii.gz")),
    )
    source = nib.load(os.path.join(case, f"{subject}_t1.nii.gz"))
    assert theirs.shape == ours.shape == source.shape and theirs.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(theirs.dataobj), np.asarray(ours.dataobj))
    np.testing.assert_allclose(theirs.affine, source.affine)
    assert set(np.unique(np.asarray(theirs.dataobj))) <= {0, 1, 2, 4}


def test_monais_network_check_passes_on_the_bundle(exported):
    _, cwd, _, _ = exported
    done = python(
        *("-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def"),
        *(
            "--meta_file",
            "fedseg_bundle/configs/metadata.json",
            "--config_file",
            "fedseg_bundle/configs/inference.json",
        ),
        cwd=cwd,
    )
    assert done.returncode == 0 and "data shape of network is verified with no error" in done.stdout + done.stderr


def test_the_model_card_holds_the_runs_cross_site_scores_and_case_counts(exported):
    run, cwd, _, _ = exported
    with open(os.path.join(cwd, "fedseg_bundle", METADATA_FILE), encoding="utf-8") as f:
        card = json.load(f)["model_card"]
    evaluation = card["evaluation"]
    assert evaluation["source"] == "cross_site_eval" and sorted(evaluation["sites"]) == ["site-1", "site-2"]
    for site, scores in evaluation["sites"].items():
        recorded = run.cross_site[site]["SRV_FL_global_model.pt"]
        assert scores == {k: pytest.approx(recorded[k]) for k in SCORE_KEYS} | {"n_cases": recorded["n_cases"]}
    assert evaluation["pooled"]["n_cases"] == sum(s["n_cases"] for s in evaluation["sites"].values())
    last = run.rounds[-1]["sites"]
    assert card["sites"] == {
        site: {
            "training_cases": int(last[site]["n_train_cases"]),
            "validation_cases": int(last[site]["n_val_cases_site"]),
        }
        for site in ("site-1", "site-2")
    }
    assert card["algorithm"]["name"] == "scaffold" and card["rounds"] == 2 and card["data"]["kind"] == "synthetic"


def test_the_best_model_of_the_fedref_run(fedref_run, tmp_path):
    """FLARE's model selector keeps a best global model in a real run; without cross-site evaluation the card
    says the model was not evaluated."""
    _, run = fedref_run
    out = export_bundle(run.folder, str(tmp_path / "best"), model="best")
    with open(os.path.join(out, METADATA_FILE), encoding="utf-8") as f:
        card = json.load(f)["model_card"]
    assert card["model"]["which"] == "best" and card["model"]["after_round"] in (0, 1)
    assert card["algorithm"]["settings"]["buffer_size"] == 2 and card["evaluation"]["source"] == "not evaluated"
