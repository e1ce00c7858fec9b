"""`fedseg export-bundle` on hand-made runs: the bundle MONAI's specification asks for, its pipeline equal to
`fedseg infer`'s (run here by MONAI in this process; `tests/integration/test_bundle_monai.py` runs MONAI's command
line on a real federation's bundle), the model card's numbers from the run's artifacts, and the refusals."""

from __future__ import annotations

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.fets_factory import save, write_subject

from fedseg.app.bundle import (
    INFERENCE_FILE,
    METADATA_FILE,
    MODEL_FILE,
    BundleError,
    export_bundle,
    unet_state,
)
from fedseg.app.cli import main
from fedseg.app.infer import segment
from fedseg.data import validation_transforms
from fedseg.network import FedSegUNet
from fedseg.regions import MODALITIES, regions_to_labels

CONFIG = {"channels": [4, 8], "strides": [2]}
SETTINGS = {"channels": [4, 8], "crop": [16, 16, 16], "algorithm": "fedref", "buffer_size": 3, "lambda2": 0.3}
SHAPE = (24, 20, 16)  # larger than the window: the sliding window blends overlapping patches


def score(dice: float, n: int) -> dict:
    """A site's cross-site scores as FLARE's evaluation records them (hand-made numbers)."""
    return {
        "dice_tc": dice - 0.1,
        "dice_wt": dice + 0.1,
        "dice_et": dice - 0.2,
        "dice_mean": dice,
        "hd95_tc": 10.0 + n,
        "hd95_wt": 8.0,
        "hd95_et": 12.0,
        "n_cases": n,
    }


def network(bias: float, seed: int = 0) -> FedSegUNet:
    """A small network whose output has tumour and background (biased last layer), as FLARE's persistor saves it."""
    torch.manual_seed(seed)
    net = FedSegUNet(**CONFIG)
    with torch.no_grad():
        net.unet.model[-1][-1].conv.unit0.conv.bias.copy_(torch.tensor([0.2, 0.4, 0.1]) + bias)
    return net


def save_checkpoint(path, net: FedSegUNet, after_round: int) -> None:
    torch.save({"model": net.state_dict(), "meta_props": {"current_round": after_round}, "train_conf": {}}, path)


def make_run(root, cross_site: bool = True, best: bool = True, data_source="synthetic (/home/someone/data)") -> str:
    """A finished 2-site, 2-round FedRef run as the simulator leaves it, with its final (and best) global model."""
    run = root / "run"
    server = run / "server" / "simulate_job"
    os.makedirs(server / "app_server")
    records = [
        {
            "round": r,
            "algorithm": "fedref",
            "sites": {
                "site-1": {**score(0.3 + 0.2 * r, 3), "n_train_cases": 9, "n_val_cases_site": 3},
                "site-2": {**score(0.5 + 0.1 * r, 1), "n_train_cases": 4, "n_val_cases_site": 1},
            },
        }
        for r in range(2)
    ]
    (server / "round_metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    recorded = {**SETTINGS, "sites": ["site-1", "site-2"], "num_rounds": 2, "data_root": "/home/someone/sites"}
    info = {"settings": recorded, "data_source": data_source, "mode": "simulator", "status": "COMPLETED"}
    (run / "run.json").write_text(json.dumps({**info, "completed": True, "planned_rounds": 2}))
    save_checkpoint(server / "app_server" / "FL_global_model.pt", network(0.0), 1)
    if best:
        save_checkpoint(server / "app_server" / "best_FL_global_model.pt", network(-0.3, seed=1), 0)
    if cross_site:
        os.makedirs(server / "cross_site_val")
        cross = {
            "site-1": {"SRV_FL_global_model.pt": score(0.8, 3), "SRV_best_FL_global_model.pt": score(0.7, 3)},
            "site-2": {"SRV_FL_global_model.pt": score(0.6, 1), "SRV_best_FL_global_model.pt": score(0.5, 1)},
        }
        (server / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(cross))
    return str(run)


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("case"))
    write_subject(root, "FeTS2022_01341", SHAPE, seed=3)
    return os.path.join(root, "FeTS2022_01341")


def read(folder, name) -> dict:
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def parsed(folder, name: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(folder, INFERENCE_FILE))
    parser["bundle_root"] = str(folder)
    return parser.get_parsed_content(name)


def targets(config) -> list[str]:
    if isinstance(config, dict):
        found = [config["_target_"]] if "_target_" in config else []
        return found + [t for v in config.values() for t in targets(v)]
    if isinstance(config, list):
        return [t for v in config for t in targets(v)]
    return []


def test_the_bundle_holds_what_monais_specification_asks_and_names_only_monai(run_dir, tmp_path):
    from monai.bundle.config_item import ComponentLocator

    out = export_bundle(run_dir, str(tmp_path / "bundle"))
    for name in ("LICENSE", METADATA_FILE, INFERENCE_FILE, MODEL_FILE, "docs/README.md", "docs/data_license.txt"):
        assert os.path.isfile(os.path.join(out, name)), name
    meta = read(out, METADATA_FILE)
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "task", "description"):
        assert meta[key], key
    assert meta["version"] in meta["changelog"] and "authors" in meta and "copyright" in meta
    assert set(meta["required_packages_version"]) == {"nibabel", "fire"}
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == 4 and list(image["channel_def"].values())[0] == "T1"
    assert [v.split(":")[0] for v in pred["channel_def"].values()] == ["TC", "WT", "ET"]
    assert image["spatial_shape"] == pred["spatial_shape"] == SETTINGS["crop"]
    assert "not for diagnosis" in meta["intended_use"] and "Apache License" in open(os.path.join(out, "LICENSE")).read()
    # model.pt: a plain state dict, the keys and values of the run's network without FedSegUNet's wrapper
    state = torch.load(os.path.join(out, MODEL_FILE), weights_only=True)
    built = parsed(out, "network_def")
    assert type(built).__module__.startswith("monai.") and built.load_state_dict(state, strict=True)
    for key, value in unet_state(network(0.0)).items():
        assert torch.equal(state[key], value), key
    # the config names MONAI's components and standard modules only, nothing of fedseg
    config = read(out, INFERENCE_FILE)
    text = json.dumps(config) + json.dumps({k: v for k, v in meta.items() if k != "model_card"})
    assert "fedseg" not in json.dumps(config)
    assert config["imports"] == ["$import glob", "$import os"]
    locator = ComponentLocator()
    for target in targets(config):
        assert locator.get_component_module_name(target), target
        assert all(m.startswith("monai.") for m in np.atleast_1d(locator.get_component_module_name(target)))
    assert "/home/someone" not in text + open(os.path.join(out, METADATA_FILE)).read()  # no path of the machine


@pytest.mark.filterwarnings("ignore:parsing config_file")  # MONAI's warning on running any config: ours
def test_monai_runs_the_bundle_and_segments_the_case_as_fedseg_infer_does(run_dir, case, tmp_path, monkeypatch):
    from monai.bundle import run

    out = export_bundle(run_dir, str(tmp_path / "bundle"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # MONAI's workflow puts the bundle's folder on it
    run(
        config_file=os.path.join(out, INFERENCE_FILE),
        logging_file=False,  # this process's logging stays as pytest set it
        bundle_root=out,
        dataset_dir=case,
        output_dir=str(tmp_path / "seg"),
    )
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()  # no global torch state left changed
    by_monai = nib.load(tmp_path / "seg" / "FeTS2022_01341_seg.nii.gz")
    model = os.path.join(run_dir, "server", "simulate_job", "app_server", "FL_global_model.pt")
    ours = segment(case, model, str(tmp_path / "ours.nii.gz"), CONFIG, roi=SETTINGS["crop"], device="cpu")
    labels = np.asarray(by_monai.dataobj)
    assert labels.shape == SHAPE and by_monai.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(labels, ours.labels)
    np.testing.assert_allclose(by_monai.affine, nib.load(os.path.join(case, "FeTS2022_01341_t1.nii.gz")).affine)
    assert len(np.unique(labels)) >= 3  # tumour and background: the comparison is not between two empty masks


def test_a_folder_of_subject_folders_gives_each_and_no_case_is_an_error(run_dir, case, tmp_path, monkeypatch):
    out = export_bundle(run_dir, str(tmp_path / "bundle"))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(out, INFERENCE_FILE))
    parser["bundle_root"] = out
    parser["dataset_dir"] = os.path.dirname(case)
    assert parser.get_parsed_content("subject_dirs") == [case]
    assert parser.get_parsed_content("datalist") == [
        {"image": [os.path.join(case, f"FeTS2022_01341_{m}.nii.gz") for m in MODALITIES]}
    ]
    parser["dataset_dir"] = str(tmp_path)  # no subject folder in it
    parser.parse(reset=True)
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("initialize")
    assert "<subject>_t1.nii.gz" in str(raised.value.__cause__)


def test_the_label_expression_is_regions_to_labels_for_every_combination(run_dir, tmp_path):
    out = export_bundle(run_dir, str(tmp_path / "bundle"))
    to_labels = parsed(out, "postprocessing").transforms[2]  # the Lambdad after the threshold
    masks = np.array([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=np.float32).T  # TC, WT, ET
    regions = masks.reshape(3, 2, 2, 2)
    got = to_labels({"pred": torch.from_numpy(regions)})["pred"]
    assert got.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(got[0].numpy(), regions_to_labels(regions > 0))


def test_the_bundles_preprocessing_is_fedsegs_validation_transforms(run_dir, case, tmp_path):
    """The four files, or one 4-channel NIfTI (what MONAI Label sends), give fedseg's normalised image exactly."""
    out = export_bundle(run_dir, str(tmp_path / "bundle"))
    bundle_steps = parsed(out, "preprocessing")
    fedseg_steps = validation_transforms(with_label=False)
    assert [type(t) for t in bundle_steps.transforms] == [type(t) for t in fedseg_steps.transforms]
    files = [os.path.join(case, f"FeTS2022_01341_{m}.nii.gz") for m in MODALITIES]
    ours, theirs = fedseg_steps({"image": files})["image"], bundle_steps({"image": files})["image"]
    assert torch.equal(ours, theirs) and torch.equal(ours.affine, theirs.affine)
    stacked = np.stack([np.asarray(nib.load(f).dataobj) for f in files], axis=-1)
    save(str(tmp_path / "four.nii.gz"), stacked, nib.load(files[0]).affine)
    assert torch.equal(bundle_steps({"image": str(tmp_path / "four.nii.gz")})["image"], ours)


def test_the_model_card_holds_the_runs_sites_rounds_algorithm_and_cross_site_scores(run_dir, tmp_path):
    out = export_bundle(run_dir, str(tmp_path / "bundle"))
    meta = read(out, METADATA_FILE)
    card = meta["model_card"]
    assert card["algorithm"] == {"name": "fedref", "settings": {"buffer_size": 3, "lambda2": 0.3}}
    assert card["rounds"] == 2 and card["run"]["job"] == "run" and card["run"]["completed"]
    assert card["sites"] == {
        "site-1": {"training_cases": 9, "validation_cases": 3},
        "site-2": {"training_cases": 4, "validation_cases": 1},
    }
    assert card["model"]["which"] == "final" and card["model"]["after_round"] == 1
    evaluation = card["evaluation"]
    assert evaluation["source"] == "cross_site_eval" and evaluation["model"] == "SRV_FL_global_model.pt"
    assert evaluation["sites"]["site-2"] == score(0.6, 1)
    # pooled over every case: site-1's 3 cases and site-2's 1
    assert evaluation["pooled"]["dice_mean"] == pytest.approx((3 * 0.8 + 1 * 0.6) / 4)
    assert evaluation["pooled"]["hd95_tc"] == pytest.approx((3 * 13.0 + 1 * 11.0) / 4)
    assert (
        evaluation["pooled"]["n_cases"] == 4 and meta["eval_metrics"]["dice_mean"] == evaluation["pooled"]["dice_mean"]
    )
    assert card["data"]["kind"] == "synthetic" and card["data"]["terms"].endswith("docs/data_license.txt")
    assert "data_root" not in card["settings"] and "cache_dir" not in card["settings"]
    assert set(card["versions"]) == {"fedref-seg", "monai", "torch", "nvflare", "numpy", "nibabel", "fire"}
    readme = open(os.path.join(out, "docs", "README.md"), encoding="utf-8").read()
    assert "not for diagnosis" in readme and "| pooled (every case) | 4 | 0.650 | 0.850 | 0.550 | 0.750 |" in readme
    assert "| site-1 | 9 | 3 |" in readme and "python -m monai.bundle run" in readme
    assert "synthetic data only" in open(os.path.join(out, "docs", "data_license.txt")).read()


def test_without_cross_site_evaluation_the_card_says_not_evaluated(tmp_path):
    out = export_bundle(make_run(tmp_path, cross_site=False), str(tmp_path / "bundle"))
    meta = read(out, METADATA_FILE)
    assert meta["model_card"]["evaluation"] == {
        "source": "not evaluated",
        "note": "not evaluated: the run had no cross-site evaluation",
    }
    assert "eval_metrics" not in meta
    assert "Not evaluated: the run had no cross-site evaluation." in open(os.path.join(out, "docs", "README.md")).read()


def test_the_best_model_is_exported_with_its_own_round_and_scores(run_dir, tmp_path):
    out = export_bundle(run_dir, str(tmp_path / "bundle"), model="best")
    card = read(out, METADATA_FILE)["model_card"]
    assert card["model"]["which"] == "best" and card["model"]["after_round"] == 0
    assert card["model"]["checkpoint"] == "best_FL_global_model.pt" and "model selector" in card["model"]["selected_by"]
    assert card["evaluation"]["model"] == "SRV_best_FL_global_model.pt"
    assert card["evaluation"]["sites"]["site-1"] == score(0.7, 3)
    state = torch.load(os.path.join(out, MODEL_FILE), weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in unet_state(network(-0.3, seed=1)).items())


def test_what_the_data_was_comes_from_the_run_or_from_data(tmp_path):
    from fedseg.app.artifacts import load_run
    from fedseg.app.bundle_card import data_kind

    sites, source = tmp_path / "sites", tmp_path / "fets"
    os.makedirs(sites)
    os.makedirs(source)
    (sites / "prep_summary.json").write_text(json.dumps({"source": str(source)}))
    run = load_run(make_run(tmp_path / "a", data_source=None))
    assert data_kind(run) == "not recorded" and data_kind(run, "fets2022") == "fets2022"
    run.run_info["settings"]["data_root"] = str(sites)
    assert data_kind(run) == "fets2022"
    (source / "synthetic.json").write_text("{}")  # what `fedseg synth` leaves beside its subjects
    assert data_kind(run) == "synthetic"
    out = export_bundle(make_run(tmp_path / "b", data_source=None), str(tmp_path / "bundle"), data="fets2022")
    terms = open(os.path.join(out, "docs", "data_license.txt")).read()
    assert "FeTS2022 training data" in terms and "https://fets-ai.github.io/Challenge/" in terms


def test_out_is_replaced_only_with_force_and_atomically(run_dir, tmp_path):
    out = tmp_path / "bundle"
    os.makedirs(out)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match=r"bundle: a folder that is not empty; give --force"):
        export_bundle(run_dir, str(out))
    assert os.listdir(out) == ["keep.txt"]
    export_bundle(run_dir, str(out), force=True)
    assert not (out / "keep.txt").exists() and (out / "configs" / "inference.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["bundle", "run"]  # no temporary folder left beside it
    with pytest.raises(BundleError, match=r": holds the run .*; choose another --out"):
        export_bundle(run_dir, str(tmp_path), force=True)  # --force never replaces the run it exports
    with pytest.raises(BundleError, match=r"inference.json: not a folder"):
        export_bundle(run_dir, str(out / "configs" / "inference.json"), force=True)


def test_a_run_without_the_model_is_one_line_naming_the_run(run_dir, tmp_path, capsys):
    os.remove(os.path.join(run_dir, "server", "simulate_job", "app_server", "best_FL_global_model.pt"))
    assert main(["export-bundle", run_dir, "--out", str(tmp_path / "b"), "--model", "best"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"fedseg export-bundle: {run_dir}: no best global model")
    os.remove(os.path.join(run_dir, "server", "simulate_job", "app_server", "FL_global_model.pt"))
    assert main(["export-bundle", run_dir, "--out", str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err == (
        f"fedseg export-bundle: {run_dir}: no global model (FL_global_model.pt) below it: the server saved no model\n"
    )
    assert main(["export-bundle", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")]) == 1
    assert "no such run folder" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_the_demo_writes_the_bundle_beside_its_report_and_the_report_links_it(run_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from fedseg.app import demo
    from fedseg.jobs import simulate

    out = tmp_path / "demo"
    settings = SimpleNamespace(seed=0, data_root=str(out / "sites"), algorithm="fedref", num_rounds=2, job_name="j")
    settings.sites = ["site-1"]
    monkeypatch.setattr(demo, "demo_sites", lambda out, seed: ("data", os.path.join(out, "sites")))
    monkeypatch.setattr(simulate, "run_simulation", lambda settings, workspace, data_source: run_dir)
    overlay = tmp_path / "overlay.png"
    overlay.write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setattr(demo, "segment_one_validation_case", lambda run, site, out: str(overlay))
    assert demo.run_demo(settings, str(out)) == 0
    assert read(out / "bundle", METADATA_FILE)["model_card"]["model"]["which"] == "final"
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert '<a href="../bundle/docs/README.md">model card</a>' in page
    assert json.loads((out / "report" / "summary.json").read_text())["bundle"] == "../bundle"


def test_monai_offers_the_extras_the_readme_names():
    """README: elsewhere `pip install "monai[nibabel,fire]==1.6.1"` gives what the bundle needs."""
    from importlib.metadata import metadata

    extras = metadata("monai").get_all("Provides-Extra")
    assert {"nibabel", "fire"} <= set(extras)
