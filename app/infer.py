"""Segment a new case with a trained global model: FeTS labels {0, 1, 2, 4} in the input's exact grid.

The four modalities are read and normalised as in validation, the network runs through MONAI's
sliding-window inferer, each region channel is thresholded at 0.5 (MONAI's ``Activations`` and ``AsDiscrete``)
and the overlapping regions become FeTS labels (``fedseg.regions.regions_to_labels``). The exported MONAI
bundle (``fedseg.app.bundle``) runs the same MONAI components with the same constants (``SW_BATCH_SIZE``,
``SW_OVERLAP``, ``THRESHOLD``), so its segmentation is this one, voxel for voxel. The output NIfTI keeps the
input's shape, affine and orientation. Optionally: an overlay PNG (axial, coronal and sagittal slices through
the tumour) and the volume of each region in millilitres.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

import nibabel as nib
import numpy as np
import torch

from fedseg.atomic import atomic_path
from fedseg.checkpoint import load_network
from fedseg.data import validation_transforms
from fedseg.network import network_config
from fedseg.regions import ENHANCING, MODALITIES, NECROTIC_CORE, OEDEMA, REGIONS, regions_to_labels
from fedseg.settings import SettingError, TrainingSettings, checked_settings

LABEL_COLOURS = {NECROTIC_CORE: (0.9, 0.1, 0.1), OEDEMA: (0.1, 0.8, 0.2), ENHANCING: (1.0, 0.85, 0.0)}
LABEL_NAMES = {NECROTIC_CORE: "necrotic core", OEDEMA: "oedema", ENHANCING: "enhancing tumour"}
# the sliding window and the threshold; the exported bundle's inference.json is written from the same values
SW_BATCH_SIZE = 4
SW_OVERLAP = 0.25
THRESHOLD = 0.5


class InferenceError(ValueError):
    """The case or the model cannot be used (one line: which file or model, and why)."""


@dataclass
class Segmentation:
    labels: np.ndarray
    affine: np.ndarray
    volumes_ml: dict[str, float]
    output: str
    overlay: str | None = None


def modality_files(case: str | Sequence[str]) -> list[str]:
    """The four modality files, in network order, from a FeTS subject folder or an explicit list."""
    if isinstance(case, (list, tuple)):
        if len(case) != len(MODALITIES):
            raise InferenceError(
                f"expected {len(MODALITIES)} modality files ({', '.join(MODALITIES)}), got {len(case)}"
            )
        files = list(case)
    else:
        sid = os.path.basename(os.path.normpath(case))
        files = [os.path.join(case, f"{sid}_{m}.nii.gz") for m in MODALITIES]
    for modality, path in zip(MODALITIES, files):
        if not os.path.isfile(path):
            raise InferenceError(f"missing modality {modality}: no file {path}")
    return files


def check_geometry(files: list[str]) -> tuple[tuple[int, ...], np.ndarray, nib.Nifti1Header]:
    """Shape, affine and header of the case; all four modalities must share shape and affine."""
    reference = None
    for modality, path in zip(MODALITIES, files):
        try:
            image = nib.load(path)
        except Exception as exc:
            raise InferenceError(f"{path}: unreadable ({exc.__class__.__name__}: {exc})") from exc
        if len(image.shape) != 3:
            raise InferenceError(f"{path}: expected a 3D volume, found shape {image.shape}")
        if reference is None:
            reference = (modality, image.shape, image.affine, image.header)
        elif image.shape != reference[1]:
            raise InferenceError(f"{path}: shape {image.shape} differs from {reference[0]} {reference[1]}")
        elif not np.allclose(image.affine, reference[2], atol=1e-3):
            raise InferenceError(f"{path}: affine differs from {reference[0]}")
    return reference[1], reference[2], reference[3]


def region_volumes(labels: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Millilitres of each tumour region and label."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    volumes = {
        "TC": float(np.isin(labels, (NECROTIC_CORE, ENHANCING)).sum() * voxel_ml),
        "WT": float((labels > 0).sum() * voxel_ml),
        "ET": float((labels == ENHANCING).sum() * voxel_ml),
    }
    for label, name in LABEL_NAMES.items():
        volumes[name] = float((labels == label).sum() * voxel_ml)
    return volumes


@torch.no_grad()
def predict_labels(network: torch.nn.Module, files: list[str], roi: Sequence[int], device: torch.device) -> np.ndarray:
    """The case's FeTS labels: the pipeline the bundle's inference.json spells out (``fedseg.app.bundle``)."""
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Activations, AsDiscrete

    data = validation_transforms(with_label=False)({"image": files})
    image = data["image"].unsqueeze(0).to(device)
    predictor = torch.autocast(device.type, enabled=device.type == "cuda")(network)  # AMP on CUDA only
    logits = SlidingWindowInferer(list(roi), sw_batch_size=SW_BATCH_SIZE, overlap=SW_OVERLAP)(image, predictor)
    regions = AsDiscrete(threshold=THRESHOLD)(Activations(sigmoid=True)(logits[0]))
    return regions_to_labels(regions.cpu().numpy() > 0)


def overlay_png(flair: np.ndarray, labels: np.ndarray, path: str, title: str = "") -> None:
    """Axial, coronal and sagittal slices through the tumour's centre, each label in its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tumour = np.argwhere(labels > 0)
    centre = tumour.mean(axis=0).round().astype(int) if len(tumour) else np.array(labels.shape) // 2
    views = [
        ("axial", flair[:, :, centre[2]], labels[:, :, centre[2]]),
        ("coronal", flair[:, centre[1], :], labels[:, centre[1], :]),
        ("sagittal", flair[centre[0], :, :], labels[centre[0], :, :]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    scale = np.percentile(flair[flair > 0], 99) if (flair > 0).any() else 1.0
    for ax, (name, background, mask) in zip(axes, views):
        ax.imshow(np.rot90(background), cmap="gray", vmin=0, vmax=scale)
        colour = np.zeros((*mask.shape, 4))
        for label, rgb in LABEL_COLOURS.items():
            colour[mask == label] = (*rgb, 0.5)
        ax.imshow(np.rot90(colour))
        ax.set_title(name)
        ax.axis("off")
    fig.legend(
        handles=[Patch(color=LABEL_COLOURS[k], label=v) for k, v in LABEL_NAMES.items()],
        loc="lower center",
        ncol=3,
        frameon=False,
    )
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def segment(
    case: str | Sequence[str],
    model_path: str,
    output: str,
    network_config: dict | None = None,
    roi: Sequence[int] | None = None,
    overlay: str | None = None,
    device: str | None = None,
) -> Segmentation:
    """Segment one case and write ``output`` (NIfTI, labels {0,1,2,4}, the input's grid) atomically.

    ``network_config``: the network's constructor arguments (default: the default profile's network); ``roi``:
    the sliding-window size (default: the default profile's crop)."""
    roi = roi or TrainingSettings().crop
    files = modality_files(case)
    shape, affine, header = check_geometry(files)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        network = load_network(model_path, network_config).to(target)
    except (ValueError, FileNotFoundError) as exc:
        raise InferenceError(str(exc)) from exc
    labels = predict_labels(network, files, roi, target)
    if labels.shape != tuple(shape):  # the transforms keep the grid; this guards the promise
        raise InferenceError(f"prediction shape {labels.shape} differs from the input {shape}")
    out_header = header.copy()
    out_header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(labels.astype(np.uint8), affine, out_header)
    image.set_qform(affine, code=int(header["qform_code"]) or 1)
    image.set_sform(affine, code=int(header["sform_code"]) or 1)
    image.header["scl_slope"], image.header["scl_inter"] = 1.0, 0.0
    with atomic_path(output) as tmp:
        nib.save(image, tmp + ".nii.gz")
        os.replace(tmp + ".nii.gz", tmp)
    result = Segmentation(labels, affine, region_volumes(labels, affine), output)
    if overlay:
        flair = np.asarray(nib.load(files[MODALITIES.index("flair")]).dataobj, dtype=np.float32)
        title = os.path.basename(os.path.normpath(case)) if isinstance(case, str) else ""
        overlay_png(flair, labels, overlay, title=title)
        result.overlay = overlay
    return result


def network_settings(run_folder: str) -> tuple[str, dict, list[int]]:
    """(global model, network config, sliding-window size) of a finished run."""
    from fedseg.app.artifacts import load_run

    run = load_run(run_folder)
    recorded = run.run_info.get("settings", {})
    # the run's training settings as run.json records them; a setting it lacks has its default
    try:
        settings = checked_settings({f.name: recorded[f.name] for f in fields(TrainingSettings) if f.name in recorded})
    except SettingError as exc:
        raise InferenceError(f"{run_folder}: {exc}") from exc
    if not run.global_model:
        raise InferenceError(f"{run_folder}: no global model found")
    return run.global_model, network_config(settings.channels), list(settings.crop)


def volumes_json(result: Segmentation) -> str:
    return json.dumps({k: round(v, 3) for k, v in result.volumes_ml.items()}, indent=2)


__all__ = ["segment", "InferenceError", "network_settings", "REGIONS"]
