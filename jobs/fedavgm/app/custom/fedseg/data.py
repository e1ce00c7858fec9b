"""A site's data: its MONAI datalist, the transforms, and cached datasets.

A prepared site folder holds ``datalist.json`` in MONAI's decathlon format: ``training`` and ``validation``
lists of ``{"image": [t1, t1ce, t2, flair], "label": seg}`` with paths relative to the folder. The four
modalities are stacked as channels in ``regions.MODALITIES`` order; the label becomes TC/WT/ET masks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from monai.data import CacheDataset, DataLoader, load_decathlon_datalist
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from fedseg.regions import ENHANCING

DATALIST_NAME = "datalist.json"
DATA_ROOT_ENV = "FEDSEG_DATA_ROOT"


def site_folder(site_name: str, data_root: str | None = None) -> str:
    """The prepared folder of a site: ``<data_root>/<site_name>``.

    ``data_root`` comes from the job's arguments or, when absent, from the site's own environment
    (``FEDSEG_DATA_ROOT``), so that a job folder holds no path of the researcher's machine.
    """
    root = data_root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise ValueError(f"site {site_name}: no data root given (pass --data_root or set {DATA_ROOT_ENV})")
    folder = os.path.join(os.path.abspath(os.path.expanduser(root)), site_name)
    if not os.path.isfile(os.path.join(folder, DATALIST_NAME)):
        raise FileNotFoundError(f"site {site_name}: no {DATALIST_NAME} in {folder}")
    return folder


def load_site_datalist(folder: str) -> tuple[list[dict], list[dict]]:
    """(training, validation) items of a site folder's datalist, with absolute paths."""
    path = os.path.join(folder, DATALIST_NAME)
    training = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training", base_dir=folder)
    validation = load_decathlon_datalist(path, is_segmentation=True, data_list_key="validation", base_dir=folder)
    return training, validation


def _load_and_normalise(with_label: bool = True) -> list:
    keys = ["image", "label"] if with_label else ["image"]
    steps = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys="image"),
        EnsureTyped(keys=keys, track_meta=True),
    ]
    if with_label:
        steps.append(ConvertToMultiChannelBasedOnBratsClassesd(keys="label", et_label=ENHANCING))
    return steps + [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]


def train_transforms(crop_size: Sequence[int], samples_per_case: int = 2) -> Compose:
    """Deterministic loading (cached) then random crops around tumour and background, flips, intensity jitter."""
    crop_size = list(crop_size)
    return Compose(
        _load_and_normalise()
        + [
            SpatialPadd(keys=["image", "label"], spatial_size=crop_size),
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=crop_size,
                pos=1,
                neg=1,
                num_samples=samples_per_case,
                image_key="image",
                image_threshold=0,
            ),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )


def validation_transforms(with_label: bool = True) -> Compose:
    """Whole volumes, normalised; the network sees them through a sliding window (also used for inference)."""
    return Compose(_load_and_normalise(with_label))


def make_loaders(
    folder: str,
    crop_size: Sequence[int],
    batch_size: int = 2,
    samples_per_case: int = 2,
    num_workers: int = 0,
    cache_rate: float = 1.0,
    seed: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders of a site folder; decoded volumes are cached in memory."""
    training, validation = load_site_datalist(folder)
    if not training:
        raise ValueError(f"{folder}: the datalist has no training cases")
    augment = train_transforms(crop_size, samples_per_case)
    augment.set_random_state(seed=seed)
    # Caching runs in one thread: MONAI's LoadImaged shares its reader between threads, and with several
    # threads a four-file image now and then comes back with one channel (seen with monai 1.6.1).
    train_ds = CacheDataset(training, augment, cache_rate=cache_rate, num_workers=1, progress=False)
    val_ds = CacheDataset(validation, validation_transforms(), cache_rate=cache_rate, num_workers=1, progress=False)
    train_loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=num_workers)
    return train_loader, val_loader
