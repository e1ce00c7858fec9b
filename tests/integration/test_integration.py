"""The README's step-by-step commands as a user types them (`fedseg synth`, `prepare`, `simulate --rounds 10`,
`report`, then `fedseg infer` on a case), on tiny volumes and a tiny network: a real 3-site, 10-round
FedRef federation in FLARE's simulator, judged by its artifacts."""

from __future__ import annotations

import glob
import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.commands import fedseg, ok

from fedseg.app.artifacts import load_run
from fedseg.app.infer import network_settings
from fedseg.checkpoint import load_network, load_state_dict

SITES = ["site-1", "site-2", "site-3"]
TINY = [
    "--local-epochs",
    "1",
    "--crop",
    "32",
    "32",
    "24",
    "--channels",
    "8",
    "16",
    "32",
]  # the README's command takes these


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """The four commands of the README's "The same steps one by one", in a fresh folder; returns it."""
    root = tmp_path_factory.mktemp("steps")
    cwd = str(root)
    ok(fedseg("synth", "--out", "data", "--shape", "32", "32", "24", cwd=cwd))
    ok(fedseg("prepare", "data/MICCAI_FeTS2022_TrainingData", "--out", "sites", cwd=cwd))
    ok(fedseg("simulate", "--data-root", "sites", "--workspace", "workspace", "--rounds", "10", *TINY, cwd=cwd))
    output = ok(fedseg("report", "workspace/fedseg_fedref", cwd=cwd))
    assert f"report: {root / 'workspace' / 'fedseg_fedref' / 'report' / 'index.html'}" in output
    return root


def test_one_metrics_line_per_round_with_every_site(steps):
    folder = str(steps / "workspace" / "fedseg_fedref")
    run = load_run(folder)
    assert [r["round"] for r in run.rounds] == list(range(10))
    for record in run.rounds:
        assert record["algorithm"] == "fedref"
        assert sorted(record["sites"]) == SITES
        for site in record["sites"].values():
            assert 0.0 <= site["dice_mean"] <= 1.0
            assert site["num_steps"] > 0 and math.isfinite(site["train_loss"])
    # p = 3 (the default): rounds 0 and 1 are warm-up (plain FedAvg), the MAP step applies from round 2
    assert [r["fedref"]["applied"] for r in run.rounds] == [False, False] + [True] * 8
    assert run.rounds[-1]["fedref"]["buffer"] == 3
    # the same per-round scalars are streamed to the server's TensorBoard, one folder per site
    for site in SITES:
        assert glob.glob(os.path.join(folder, "**", "tb_events", site, "events.out.tfevents.*"), recursive=True)


def test_saved_global_model_is_the_fedref_model_and_loads_into_the_network(steps):
    run = load_run(str(steps / "workspace" / "fedseg_fedref"))
    _, config, _ = network_settings(run.folder)
    network = load_network(run.global_model, config)
    with torch.no_grad():
        out = network(torch.zeros(1, 4, 32, 32, 24))
    assert out.shape == (1, 3, 32, 32, 24)
    saved = load_state_dict(run.global_model)
    buffer = torch.load(run.reference_buffer, weights_only=True)
    newest = buffer["models"][-1]  # FedRef pushes each new global model: it must be what was persisted
    assert buffer["capacity"] == 3 and len(buffer["models"]) == 3
    for name, value in newest.items():
        np.testing.assert_allclose(saved[name].numpy(), np.asarray(value), rtol=1e-6, atol=1e-7)
    oldest = buffer["models"][0]
    assert any(not np.allclose(np.asarray(oldest[k]), np.asarray(newest[k])) for k in newest)


def test_report_numbers_are_finite_in_range_and_show_learning(steps):
    report = steps / "workspace" / "fedseg_fedref" / "report"
    assert (report / "index.html").is_file() and (report / "metrics.csv").is_file()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["algorithm"] == "fedref" and summary["rounds"] == 10
    assert summary["final"]["source"] == "cross_site_eval"
    assert sorted(summary["final"]["sites"]) == SITES
    for scores in [summary["final"]["overall"], *summary["final"]["sites"].values()]:
        for key in ("dice_tc", "dice_wt", "dice_et", "dice_mean"):
            assert math.isfinite(scores[key]) and 0.0 <= scores[key] <= 1.0, key
    first = load_run(str(steps / "workspace" / "fedseg_fedref")).rounds[0]["sites"]
    assert summary["final"]["overall"]["dice_wt"] > max(s["dice_wt"] for s in first.values())  # 10 rounds learned
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "not for diagnosis" in page
    assert summary["settings"]["buffer_size"] == 3 and summary["wall_seconds"] > 0


def test_infer_segments_a_case_as_the_readme_writes_it(steps):
    subject = json.loads((steps / "sites" / "site-1" / "datalist.json").read_text())["validation"][0]["subject"]
    output = ok(
        fedseg(
            "infer",
            f"data/MICCAI_FeTS2022_TrainingData/{subject}",
            "--run",
            "workspace/fedseg_fedref",
            "--out",
            f"{subject}_seg.nii.gz",
            "--overlay",
            f"{subject}.png",
            cwd=str(steps),
        )
    )
    assert (steps / f"{subject}.png").stat().st_size > 0
    seg = nib.load(steps / f"{subject}_seg.nii.gz")
    t1 = nib.load(steps / "data" / "MICCAI_FeTS2022_TrainingData" / subject / f"{subject}_t1.nii.gz")
    assert seg.shape == t1.shape and np.allclose(seg.affine, t1.affine)
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    volumes = json.loads(output.split("volumes (ml): ", 1)[1])
    voxel_ml = float(np.prod(seg.header.get_zooms())) / 1000
    assert volumes["WT"] == pytest.approx(np.count_nonzero(labels) * voxel_ml, rel=1e-3, abs=1e-3)
    assert volumes["WT"] >= volumes["TC"] >= volumes["ET"] >= 0
