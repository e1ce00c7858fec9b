"""``fedseg export-bundle``: a run's global model as a MONAI bundle, the unit MONAI's tools exchange models in.

The bundle follows MONAI's bundle specification (the model zoo's ``brats_mri_segmentation`` is the model):

    LICENSE                  Apache-2.0, the project's licence, for the configs and the weights
    configs/metadata.json    versions, task, network_data_format, intended use, and the model card (``model_card``)
    configs/inference.json   what ``python -m monai.bundle run`` executes: read, normalise, slide, threshold, save
    configs/logging.conf     the logging MONAI's workflow sets up
    models/model.pt          the weights: a plain state dict of the MONAI ``UNet`` that the config builds
    docs/README.md           the model card for people
    docs/data_license.txt    the terms of the data the weights were trained on

The config names MONAI components and standard expressions only, nothing of fedseg: the network is
``monai.networks.nets.UNet`` with the run's settings (what ``fedseg.network.FedSegUNet`` wraps; the state dict is
its inner network's, without the ``unet.`` prefix), and the pipeline is ``fedseg infer``'s, built from the same
MONAI transforms and the same constants (``fedseg.app.infer``): the preprocessing of
``fedseg.data.validation_transforms``, the sliding window, sigmoid and threshold, then the TC/WT/ET masks to FeTS
labels 1, 2, 4 by ``fedseg.regions.regions_to_labels``'s rule, written as one expression. Before the folder is
moved into place, MONAI's own ``ConfigParser`` builds the network from the written config, which must take
model.pt strictly and give the run's network's output. The model card is ``fedseg.app.bundle_card``, the bundle's
documents ``fedseg.app.bundle_docs``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

INFERENCE_FILE = os.path.join("configs", "inference.json")
METADATA_FILE = os.path.join("configs", "metadata.json")
MODEL_FILE = os.path.join("models", "model.pt")
# FLARE's names (DefaultCheckpointFileName) of the persistor's last and best global models, in the server's app folder
CHECKPOINTS = {"final": "FL_global_model.pt", "best": "best_FL_global_model.pt"}
UNET_PREFIX = "unet."  # FedSegUNet keeps MONAI's UNet as ``self.unet``
DATA_KINDS = ("synthetic", "fets2022")  # what --data may say the sites trained on (``fedseg.app.bundle_card.DATA``)


class BundleError(ValueError):
    """The run cannot be exported, or the bundle did not check out (one line: which run or folder, and why)."""


@dataclass
class Checkpoint:
    """The global model to export: its file, which one (final or best), the round it was saved after."""

    path: str
    which: str
    after_round: int | None


def find_checkpoint(run, which: str = "final") -> Checkpoint:
    """The run's final global model (FLARE's ``FL_global_model.pt``) or its best one (``best_FL_global_model.pt``,
    saved by FLARE's model selector on the sites' per-round validation)."""
    from fedseg.checkpoint import load_file

    if which not in CHECKPOINTS:
        raise BundleError(f"--model {which}: choose one of {', '.join(CHECKPOINTS)}")
    name = CHECKPOINTS[which]
    if not run.global_model:
        raise BundleError(f"{run.folder}: no global model ({name}) below it: the server saved no model")
    path = os.path.join(os.path.dirname(run.global_model), name)
    if not os.path.isfile(path):
        raise BundleError(
            f"{run.folder}: no {which} global model ({name} beside {os.path.basename(run.global_model)}): "
            "FLARE's model selector saved none; export the final one (--model final)"
        )
    saved = load_file(path)
    meta = saved.get("meta_props") if isinstance(saved, dict) else None
    after = meta.get("current_round") if isinstance(meta, dict) else None
    return Checkpoint(path, which, int(after) if isinstance(after, int) else None)


def network_def(network) -> dict:
    """The config component of the network: MONAI's UNet with the constructor arguments of ``network``."""
    from fedseg.regions import MODALITIES, REGIONS

    return {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": len(MODALITIES),
        "out_channels": len(REGIONS),
        **network.config(),
    }


def unet_state(network) -> dict:
    """The weights of the MONAI UNet inside a ``FedSegUNet``, under the keys a plain ``UNet`` has."""
    state = network.state_dict()
    assert all(k.startswith(UNET_PREFIX) for k in state), "FedSegUNet holds its network as .unet"
    return {k[len(UNET_PREFIX) :]: v.detach().clone() for k, v in state.items()}


def _preprocessing() -> dict:
    """``fedseg.data.validation_transforms(with_label=False)``, as config (a unit test holds them equal)."""
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "EnsureTyped", "keys": "@image_key", "track_meta": True},
            {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True, "channel_wise": True},
        ],
    }


def _postprocessing(threshold: float) -> dict:
    """Sigmoid, threshold, FeTS labels (WT -> 2, TC inside it -> 1, ET inside that -> 4), NIfTI in the input's grid."""
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "@pred_key", "sigmoid": True},
            {"_target_": "AsDiscreted", "keys": "@pred_key", "threshold": threshold},
            {
                "_target_": "Lambdad",
                "keys": "@pred_key",
                "func": "$lambda x: torch.where(x[1:2] > 0, torch.where(x[0:1] > 0, "
                "torch.where(x[2:3] > 0, 4, 1), 2), 0)",
            },
            {
                "_target_": "SaveImaged",
                "keys": "@pred_key",
                "output_dir": "@output_dir",
                "output_postfix": "@output_postfix",
                "output_ext": ".nii.gz",
                "output_dtype": "$numpy.uint8",
                "resample": False,
                "separate_folder": False,
                "savepath_in_metadict": True,
                "output_name_formatter": "$lambda metadict, saver: {'subject': "
                "os.path.basename(os.path.dirname(str(metadict['filename_or_obj']))), 'idx': None}",
            },
        ],
    }


def inference_config(network: dict, roi: list[int]) -> dict:
    """``configs/inference.json``: ``dataset_dir`` is a FeTS subject folder or a folder of them; each case's
    ``<subject>_seg.nii.gz`` (labels 0, 1, 2, 4) is written to ``output_dir``."""
    from fedseg.app.infer import SW_BATCH_SIZE, SW_OVERLAP, THRESHOLD
    from fedseg.regions import MODALITIES

    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": True,
        "dataset_dir": "/data/MICCAI_FeTS2022_TrainingData",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "output_postfix": "seg",
        "image_key": "image",
        "pred_key": "pred",
        "modalities": list(MODALITIES),
        # the folder itself if it is a FeTS subject folder (<subject>/<subject>_t1.nii.gz), else its subject folders
        "subject_dirs": "$[d for d in [os.path.normpath(@dataset_dir)] + sorted(glob.glob(os.path.join(@dataset_dir, "
        "'*'))) if os.path.isfile(os.path.join(d, os.path.basename(d) + '_' + @modalities[0] + '.nii.gz'))]",
        "datalist": "$[{@image_key: [os.path.join(d, os.path.basename(d) + '_' + m + '.nii.gz') for m in "
        "@modalities]} for d in @subject_dirs]",
        "network_def": network,
        "network": "$@network_def.to(@device).eval()",
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "preprocessing": _preprocessing(),
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(roi),
            "sw_batch_size": SW_BATCH_SIZE,
            "overlap": SW_OVERLAP,
        },
        # no gradients, AMP on CUDA only: decorators, so that running the bundle changes no global torch state
        "predictor": "$torch.no_grad()(torch.autocast(device_type=@device.type, enabled=@amp and @device.type == "
        "'cuda')(@network))",
        "postprocessing": _postprocessing(THRESHOLD),
        "segment": "$lambda item: @postprocessing({**item, @pred_key: @inferer(item[@image_key].unsqueeze(0)"
        ".to(@device), @predictor)[0]})[@pred_key].meta['saved_to']",
        "initialize": [
            # no case found: stop here, naming the file a FeTS subject folder would hold
            "$@datalist or os.stat(os.path.join(@dataset_dir, '<subject>', '<subject>_' + @modalities[0] + '.nii.gz'))",
            "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        ],
        "run": ["$[@segment(item) for item in @dataset]"],
    }


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_bundle(folder: str, network) -> None:
    """MONAI's ConfigParser builds the network from the written config; it must take model.pt strictly and give
    ``network``'s output (a seeded input of twice the network's divisor per side)."""
    import torch
    from monai.bundle import ConfigParser

    from fedseg.regions import MODALITIES

    parser = ConfigParser()
    parser.read_config(os.path.join(folder, INFERENCE_FILE))
    parser.read_meta(os.path.join(folder, METADATA_FILE))
    parser["bundle_root"] = folder
    built = parser.get_parsed_content("network_def")
    try:
        built.load_state_dict(torch.load(os.path.join(folder, MODEL_FILE), weights_only=True), strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{folder}: {MODEL_FILE} does not load into the config's network ({exc})") from exc
    side = 2 * network.divisor
    probe = torch.randn(1, len(MODALITIES), side, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(built.eval()(probe), network.eval()(probe)):
            raise BundleError(f"{folder}: the config's network does not compute the run's network")


def _refuse_to_overwrite(out: str, run_folder: str, force: bool) -> None:
    """A file, a folder that is not empty (unless ``force``), or a folder holding the run itself is refused."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise BundleError(f"{out}: not a folder; the bundle is a folder")
    if os.path.commonpath([out, os.path.abspath(run_folder)]) == out:
        raise BundleError(f"{out}: holds the run {os.path.abspath(run_folder)}; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise BundleError(f"{out}: a folder that is not empty; give --force to replace it with the bundle")


def export_bundle(run_folder: str, out: str, model: str = "final", force: bool = False, data: str | None = None) -> str:
    """Write the bundle of the run's ``model`` (final or best) to ``out`` atomically; returns ``out``'s path.

    ``data``: what the sites trained on (``synthetic`` or ``fets2022``) when the run does not record it."""
    out = os.path.abspath(out)
    _refuse_to_overwrite(out, run_folder, force)  # before the imports: a refusal is immediate
    import torch

    from fedseg.app.artifacts import load_run
    from fedseg.app.bundle_card import metadata, model_card
    from fedseg.app.bundle_docs import DATA_LICENCE_FILE, LOGGING_CONF, data_licence, licence_text, readme
    from fedseg.app.infer import network_settings
    from fedseg.atomic import atomic_directory, write_json, write_text
    from fedseg.checkpoint import load_network

    run = load_run(run_folder)
    checkpoint = find_checkpoint(run, model)
    _, config, roi = network_settings(run.folder)
    network = load_network(checkpoint.path, config)
    with atomic_directory(out) as tmp:
        for folder in ("configs", "models", "docs"):
            os.makedirs(os.path.join(tmp, folder))
        torch.save(unet_state(network), os.path.join(tmp, MODEL_FILE))
        write_json(os.path.join(tmp, INFERENCE_FILE), inference_config(network_def(network), roi))
        card = model_card(run, checkpoint, sha256(os.path.join(tmp, MODEL_FILE)), data)
        meta = metadata(card, network, roi)
        write_json(os.path.join(tmp, METADATA_FILE), meta)
        write_text(os.path.join(tmp, "configs", "logging.conf"), LOGGING_CONF)
        write_text(os.path.join(tmp, "LICENSE"), licence_text())
        write_text(os.path.join(tmp, "docs", "README.md"), readme(meta))
        write_text(os.path.join(tmp, "docs", DATA_LICENCE_FILE), data_licence(card["data"]["kind"]))
        check_bundle(tmp, network)
    return out


def describe(out: str) -> str:
    """What ``fedseg export-bundle`` prints: the folder, the model and the command that runs it."""
    with open(os.path.join(out, METADATA_FILE), encoding="utf-8") as f:
        card = json.load(f)["model_card"]
    model = card["model"]
    after = f", saved after round {model['after_round']}" if model["after_round"] is not None else ""
    return (
        f"bundle: {out}\n"
        f"model: the {model['which']} global model of {card['run']['job']} ({card['algorithm']['name']}{after})\n"
        f"run it: python -m monai.bundle run --config_file {os.path.join(out, INFERENCE_FILE)} "
        f"--bundle_root {out} --dataset_dir <FeTS subject folder> --output_dir <folder>"
    )
