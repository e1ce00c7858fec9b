"""The exported bundle's model card and ``configs/metadata.json``: where the model came from and how it scored.

``model_card`` gathers, from the run's artifacts only (``fedseg.app.artifacts``, the same numbers as the report,
``fedseg.app.report``): the algorithm and its settings, the rounds, the participating sites with their training and
validation case counts, cross-site evaluation of the exported model per site and pooled over every case (Dice and
HD95 per region; "not evaluated" when the run had none, or none of that model), the data (synthetic or FeTS2022,
with the data's terms), and the versions of fedseg and its dependencies. It holds no path of the machine that
exported it and no subject: a bundle leaves the federation. ``metadata`` puts it into MONAI's metadata.json beside
the keys the bundle specification asks for.
"""

from __future__ import annotations

import json
import math
import os
import time
from importlib import metadata as package_metadata

import fedseg
from fedseg.metrics import DICE_KEYS, HD95_KEYS
from fedseg.regions import MODALITIES, REGIONS

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
INTENDED_USE = (
    "Research use only, not for diagnosis or treatment: not cleared or approved by any regulatory agency. For "
    "research on federated learning and brain-tumour segmentation of co-registered, skull-stripped MRI in the "
    "FeTS2022/BraTS layout."
)
SCORE_KEYS = DICE_KEYS + ("dice_mean",) + HD95_KEYS
VERSIONED = ("monai", "torch", "nvflare", "numpy", "nibabel", "fire")  # beside fedref-seg itself
CHANNEL_NAMES = {"t1": "T1", "t1ce": "T1ce (T1 contrast-enhanced)", "t2": "T2", "flair": "FLAIR"}
REGION_TEXT = {
    "TC": "TC: tumour core (necrotic core and enhancing tumour, labels 1 and 4)",
    "WT": "WT: whole tumour (labels 1, 2 and 4)",
    "ET": "ET: enhancing tumour (label 4)",
}
DATA = {
    "synthetic": "synthetic subjects in the FeTS2022 layout, made by `fedseg synth` (MNI152 anatomy, simulated "
    "tumours and institutions): a demonstration model, not trained on any patient",
    "fets2022": "FeTS2022 (MICCAI Federated Tumor Segmentation Challenge 2022) training data, partitioned by "
    "institution with the challenge's partitioning CSV (`fedseg prepare`)",
    "not recorded": "not recorded by the run (the sites' own data in the FeTS2022 layout); give --data when exporting",
}
TERMS = {
    "synthetic": "no patient data; the anatomy is the MNI152 templates', under their copyright notice",
    "fets2022": "the FeTS challenge's data terms: the data come from its organisers after registration, are not "
    "in this bundle, and are cited as the challenge asks",
}
SYNTHETIC_MARKER = "synthetic.json"  # what fedseg.data_prep.synthetic writes beside the subjects it made
PREP_SUMMARY = "prep_summary.json"  # fedseg.data_prep.prep_summary.SUMMARY_NAME, in a prepared data root
# the server optimiser's settings name no algorithm in JobSettings: they are FedAdam's and FedAvgM's
SERVER_OPTIMISER = {"server_lr": ("fedadam", "fedavgm"), "server_momentum": ("fedavgm",)}
REFERENCES = [
    "FedRef: Communication-Efficient Bayesian Fine Tuning with Reference Model. arXiv:2506.23210.",
    "Kerfoot E. et al. Left-Ventricle Quantification Using Residual U-Net. STACOM 2018, LNCS 11395 "
    "(MONAI's UNet). https://doi.org/10.1007/978-3-030-12029-0_40",
    "Pati S. et al. The Federated Tumor Segmentation (FeTS) Challenge. arXiv:2105.05874.",
    "Zenk M. et al. Towards fair decentralized benchmarking of healthcare AI algorithms with the Federated Tumor "
    "Segmentation (FeTS) challenge. Nature Communications 16, 6274 (2025). https://doi.org/10.1038/s41467-025-60466-1",
]


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def versions() -> dict[str, str]:
    """fedref-seg and its dependencies as installed where the bundle was exported."""
    found = {"fedref-seg": fedseg.__version__}
    for name in VERSIONED:
        try:
            found[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def data_kind(run, given: str | None = None) -> str:
    """``synthetic``, ``fets2022`` or ``not recorded``: ``given``, else what the run says or its data root shows
    (a prepared root names its source; ``fedseg synth`` leaves its marker there)."""
    if given:
        return given
    if str(run.run_info.get("data_source") or "").startswith("synthetic"):
        return "synthetic"
    root = run.run_info.get("settings", {}).get("data_root")
    summary = os.path.join(root, PREP_SUMMARY) if root else ""
    if not os.path.isfile(summary):
        return "not recorded"
    try:
        with open(summary, encoding="utf-8") as f:
            source = json.load(f).get("source") or ""
    except (OSError, ValueError, AttributeError):
        return "not recorded"
    return "synthetic" if os.path.isfile(os.path.join(source, SYNTHETIC_MARKER)) else "fets2022"


def algorithm_settings(algorithm: str, recorded: dict) -> dict:
    """The settings of the run's algorithm (FedRef's step, FedProx's mu, the server optimiser's, FedPIDAvg's)."""
    from fedseg.jobs.settings import DEFAULT_SERVER_LR, job_fields

    chosen = {}
    for f in job_fields():
        if f.metadata["group"] not in ("fedref", "baselines") or f.name not in recorded:
            continue
        if algorithm in (f.metadata["algorithms"] or SERVER_OPTIMISER.get(f.name, ())):
            chosen[f.name] = recorded[f.name]
    if "server_lr" in chosen and chosen["server_lr"] is None:  # the optimiser's default step
        chosen["server_lr"] = DEFAULT_SERVER_LR[algorithm]
    return chosen


def run_settings(recorded: dict) -> dict:
    """Every recorded setting but this machine's own (data, cache, stopped-run folders)."""
    from fedseg.jobs.settings import LOCAL, job_fields

    local = {f.name for f in job_fields(LOCAL)} | {"checkpoint_store"}
    return {k: v for k, v in recorded.items() if k not in local}


def evaluation(run, checkpoint_name: str) -> dict:
    """Cross-site evaluation of this checkpoint: per site and pooled over every validation case of every site."""
    from fedseg.app.report import pooled

    key = "SRV_" + checkpoint_name  # how FLARE's cross-site evaluation names the server's models
    sites = {}
    for site, models in sorted((run.cross_site or {}).items()):
        scores = models.get(key) if isinstance(models, dict) else None
        if isinstance(scores, dict):
            sites[site] = {k: _number(scores.get(k)) for k in SCORE_KEYS} | {
                "n_cases": int(_number(scores.get("n_cases")) or 0)
            }
    if not sites:
        why = "the run had no cross-site evaluation" if not run.cross_site else f"cross-site evaluation has no {key}"
        return {"source": "not evaluated", "note": f"not evaluated: {why}"}
    overall = pooled(sites)
    return {
        "source": "cross_site_eval",
        "model": key,
        "note": "cross-site evaluation: the exported model on every validation case of every site",
        "sites": sites,
        "pooled": {k: overall[k] for k in SCORE_KEYS} | {"n_cases": overall["n_cases"]},
    }


def _selection(checkpoint) -> str:
    if checkpoint.which == "best":
        return (
            "the best global model, kept by FLARE's model selector (IntimeModelSelector): the one whose per-round "
            "validation by the sites had the highest dice_mean"
        )
    return "the final global model, the one the last round saved"


def model_card(run, checkpoint, model_sha256: str, data: str | None = None) -> dict:
    """Where the model came from and how it scored, from the run's artifacts (``build_summary``'s numbers)."""
    from fedseg.app.report import build_summary

    summary = build_summary(run)
    recorded = summary["settings"]
    algorithm = summary["algorithm"]
    kind = data_kind(run, data)
    validation = summary.get("validation") or {}
    sites = {
        site: {
            "training_cases": summary["training_cases"].get(site),
            "validation_cases": (validation.get(site) or {}).get("of"),
        }
        for site in summary["sites"]
    }
    return {
        "intended_use": INTENDED_USE,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "exported_by": f"fedseg export-bundle (fedref-seg {fedseg.__version__})",
        "run": {"job": os.path.basename(run.folder), "mode": run.run_info.get("mode"), **summary["job"]},
        "model": {
            "which": checkpoint.which,
            "checkpoint": os.path.basename(checkpoint.path),
            "after_round": checkpoint.after_round,
            "selected_by": _selection(checkpoint),
            "sha256": model_sha256,
        },
        "algorithm": {"name": algorithm, "settings": algorithm_settings(algorithm, recorded)},
        "rounds": summary["rounds"],
        "participation": summary["participation"],
        "sites": sites,
        "evaluation": evaluation(run, os.path.basename(checkpoint.path)),
        "data": {
            "kind": kind,
            "description": DATA[kind],
            "terms": TERMS.get(kind, TERMS["fets2022"] + " (if the sites' data were FeTS2022)")
            + "; docs/data_license.txt",
        },
        "settings": run_settings(recorded),
        "versions": versions(),
    }


def network_data_format(network, roi: list[int]) -> dict:
    """The network's input and output as MONAI's bundle specification defines them; the spatial shape is the
    sliding window's patch, which is what the network is given."""
    shape = list(roi)
    image = {
        "type": "image",
        "format": "magnitude",
        "modality": "MR",
        "num_channels": len(MODALITIES),
        "spatial_shape": shape,
        "dtype": "float32",
        "value_range": [],
        "is_patch_data": True,
        "channel_def": {str(i): CHANNEL_NAMES[m] for i, m in enumerate(MODALITIES)},
    }
    pred = {
        "type": "image",
        "format": "classes",
        "num_channels": len(REGIONS),
        "spatial_shape": shape,
        "dtype": "float32",
        "value_range": [],
        "is_patch_data": True,
        "channel_def": {str(i): REGION_TEXT[r] + ", logit" for i, r in enumerate(REGIONS)},
    }
    labels = {
        "type": "image",
        "format": "segmentation",
        "num_channels": 1,
        "spatial_shape": ["*", "*", "*"],
        "dtype": "uint8",
        "value_range": [0, 4],
        "is_patch_data": False,
        "channel_def": {"0": "FeTS labels: 0 background, 1 necrotic tumour core, 2 peritumoral oedema, 4 enhancing"},
    }
    return {"inputs": {"image": image}, "outputs": {"pred": pred}, "post_processed_outputs": {"pred": labels}}


def _eval_metrics(card: dict) -> dict:
    pooled = card["evaluation"].get("pooled") or {}
    return {k: pooled[k] for k in SCORE_KEYS if pooled.get(k) is not None}


def metadata(card: dict, network, roi: list[int]) -> dict:
    """``configs/metadata.json``: the bundle specification's keys, then the model card under ``model_card``."""
    v = card["versions"]
    sites = ", ".join(card["sites"])
    description = (
        f"A 3D U-Net (MONAI UNet, channels {network.channels}) trained by federated learning with "
        f"{card['algorithm']['name']} over {card['rounds']} rounds in NVIDIA FLARE, across {len(card['sites'])} "
        f"sites ({sites}) that never pooled their images. It segments the tumour core, whole tumour and enhancing "
        "tumour of a glioma from four co-registered MRI modalities and writes FeTS labels 1, 2, 4."
    )
    meta = {
        "schema": SCHEMA,
        "version": fedseg.__version__,
        "changelog": {fedseg.__version__: f"exported by {card['exported_by']} from run {card['run']['job']}"},
        "monai_version": v["monai"],
        "pytorch_version": v["torch"].split("+")[0],
        "numpy_version": v["numpy"],
        # nibabel reads and writes NIfTI; fire is MONAI's command line (`python -m monai.bundle`)
        "required_packages_version": {"nibabel": v["nibabel"], "fire": v["fire"]},
        "name": "FedRef-Seg brain tumour segmentation",
        "task": "Segmentation of glioma sub-regions (TC, WT, ET) in multimodal brain MRI",
        "description": description,
        "authors": f"FedRef-Seg contributors; trained in a federation of {sites}",
        "copyright": "Copyright (c) FedRef-Seg contributors",
        "data_source": card["data"]["description"],
        "data_type": "nibabel",
        "image_classes": "4 channels, co-registered and skull-stripped: T1, T1ce, T2, FLAIR (in this order), "
        "each normalised over its nonzero (brain) voxels",
        "label_classes": "FeTS labels: 1 necrotic tumour core, 2 peritumoral oedema, 4 enhancing tumour",
        "pred_classes": "3 channels, TC, WT, ET (sigmoid > 0.5 each); after postprocessing FeTS labels 0, 1, 2, 4",
        "intended_use": INTENDED_USE,
        "references": REFERENCES,
        "network_data_format": network_data_format(network, roi),
        "model_card": card,
    }
    metrics = _eval_metrics(card)
    if metrics:
        meta["eval_metrics"] = metrics
    return meta
