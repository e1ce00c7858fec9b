"""A site's data: its MONAI datalist, the cached cases, the augmentations and the loaders.

A prepared site folder holds ``datalist.json`` in MONAI's decathlon format: ``training`` and ``validation``
lists of ``{"image": [t1, t1ce, t2, flair], "label": seg}`` with paths relative to the folder. The four
modalities are stacked as channels in ``regions.MODALITIES`` order; the label becomes TC/WT/ET masks.
Decoded cases come from the site's disk cache (``fedseg.cache``), so memory does not grow with the
number of cases; per-round validation reads a fixed, seeded subset of at most ``val_max_cases`` cases
(never fewer than the site's ``min_val_cases``). Log lines give counts, never a subject id or a path: a job's
log may be read off the site; which cases were left out, and why, goes to ``LEFT_OUT_FILE`` in the cache.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.data import DataLoader, Dataset, load_decathlon_datalist
from monai.transforms import (
    CastToTyped,
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

from fedseg.cache import CACHE_DIR_ENV, CaseCache, Progress, cache_size_bytes
from fedseg.regions import DATALIST_NAME, ENHANCING
from fedseg.settings import TrainingSettings

logger = logging.getLogger("fedseg.data")

DATA_ROOT_ENV = "FEDSEG_DATA_ROOT"
DEFAULT_CACHE_NAME = "fedseg_cache"
LEFT_OUT_FILE = "left_out_cases.txt"  # in the site's cache folder: the cases that could not be decoded, and why


def site_folder(site_name: str, data_root: str | None = None) -> str:
    """The prepared folder of a site: ``<data_root>/<site_name>``.

    ``data_root`` comes from the job's arguments or, when absent, from the site's own environment
    (``FEDSEG_DATA_ROOT``), so that a job folder holds no path of the researcher's machine.
    """
    root = data_root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise ValueError(f"site {site_name}: no data root given (pass --data_root or set {DATA_ROOT_ENV})")
    folder = os.path.join(os.path.abspath(os.path.expanduser(root)), site_name)
    if not os.path.isfile(os.path.join(folder, DATALIST_NAME)):  # the path stays out of the message (job log)
        raise FileNotFoundError(
            f"site {site_name}: no {site_name}/{DATALIST_NAME} in the site's data root (data_root in its "
            f"fedseg_site.json or {DATA_ROOT_ENV})"
        )
    return folder


def cache_folder(site_name: str, data_folder: str, cache_root: str | None = None) -> str:
    """The site's disk cache: ``<cache_root>/<site>``, in the site's working area, never in its data.

    ``cache_root``: the job's ``--cache_dir``, else the site's ``FEDSEG_CACHE_DIR``, else ``fedseg_cache``
    in the process's working folder (the site's workspace).
    """
    root = os.path.abspath(os.path.expanduser(cache_root or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_NAME))
    folder = os.path.join(root, site_name)
    data = os.path.realpath(data_folder)
    if os.path.commonpath([os.path.realpath(folder), data]) == data:
        raise ValueError(
            f"site {site_name}: its cache folder is inside the data folder; data folders are never written "
            f"(set cache_dir in fedseg_site.json, or {CACHE_DIR_ENV}, elsewhere)"
        )
    return folder


def load_site_datalist(folder: str) -> tuple[list[dict], list[dict]]:
    """(training, validation) items of a site folder's datalist, with absolute paths."""
    path = os.path.join(folder, DATALIST_NAME)
    training = load_decathlon_datalist(path, is_segmentation=True, data_list_key="training", base_dir=folder)
    validation = load_decathlon_datalist(path, is_segmentation=True, data_list_key="validation", base_dir=folder)
    return training, validation


def to_regions() -> list:
    """Cached form -> what the network trains on: float32 image, TC/WT/ET masks."""
    return [
        CastToTyped(keys="image", dtype=torch.float32),
        ConvertToMultiChannelBasedOnBratsClassesd(keys="label", et_label=ENHANCING),
    ]


def train_transforms(crop_size: Sequence[int], samples_per_case: int = 2) -> Compose:
    """Random crops around tumour and background, flips and intensity jitter, on a cached case."""
    crop_size = list(crop_size)
    return Compose(
        to_regions()
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
    """Whole volumes in their own grid, normalised (inference on a new case, which is not cached)."""
    keys = ["image", "label"] if with_label else ["image"]
    steps = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys="image"),
        EnsureTyped(keys=keys, track_meta=True),
    ]
    if with_label:
        steps.append(ConvertToMultiChannelBasedOnBratsClassesd(keys="label", et_label=ENHANCING))
    return Compose(steps + [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])


def validation_subset(count: int, max_cases: int, seed: int, min_cases: int = 0) -> list[int]:
    """A fixed, seeded choice of at most ``max_cases`` of ``count`` validation cases (all when 0 or enough).

    ``max_cases`` below ``min_cases`` (the site's minimum) is raised to it: a job cannot narrow a round's
    scores to one chosen patient (the site also refuses such a job up front).
    """
    if 0 < max_cases < min_cases:
        max_cases = min_cases
    if max_cases <= 0 or count <= max_cases:
        return list(range(count))
    return sorted(random.Random(f"validation-subset-{seed}").sample(range(count), max_cases))


def _record_left_out(cache_dir: str | None, problems: list[str]) -> str:
    """Write the left-out cases, with their reasons, beside the cache; the log line's hint where to read them."""
    if not cache_dir:
        return ""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(os.path.join(cache_dir, LEFT_OUT_FILE), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in problems))
    except OSError:
        return ""
    return f" (which, and why: {LEFT_OUT_FILE} in this site's cache folder)"


@dataclass
class SiteData:
    """A site's cases and loaders: training (augmented), every validation case, the per-round subset."""

    train_cases: CaseCache
    val_cases: CaseCache
    train_loader: DataLoader
    val_loader: DataLoader
    round_val_loader: DataLoader
    round_val_indices: list[int]
    cache_dir: str | None
    problems: list[str]

    def cache_bytes(self) -> int:
        return cache_size_bytes(self.cache_dir)


def make_site_data(
    folder: str, settings: TrainingSettings, cache_dir: str | None, label: str = "site", min_val_cases: int = 0
) -> SiteData:
    """Cache every case of a site (once; later runs reuse the cache), then build its loaders.

    A case that cannot be decoded is left out, the rest go on: the log counts them, ``LEFT_OUT_FILE`` in the
    cache folder names them with the reason.
    """
    training, validation = load_site_datalist(folder)
    if not training:
        raise ValueError(f"{folder}: the datalist has no training cases")
    train_cases = CaseCache(training, cache_dir, settings.cache_ram_mb)
    val_cases = CaseCache(validation, cache_dir, settings.cache_ram_mb)
    problems = train_cases.warm(Progress(f"{label}: caching training cases"))
    problems += val_cases.warm(Progress(f"{label}: caching validation cases"))
    if problems:
        where = _record_left_out(cache_dir, problems)
        logger.error("%s: %d case(s) could not be decoded and are left out%s", label, len(problems), where)
    if not len(train_cases):
        raise ValueError(f"{label}: no training case could be decoded")
    freed = train_cases.prune(train_cases.file_names() | val_cases.file_names())
    if freed:
        logger.info("%s: removed %.0f MB of stale cache files (changed or removed cases)", label, freed / 1e6)
    augment = train_transforms(settings.crop, settings.samples_per_case)
    augment.set_random_state(seed=settings.seed)
    train_ds = Dataset(train_cases, augment)
    val_ds = Dataset(val_cases, Compose(to_regions()))
    subset = validation_subset(len(val_cases), settings.val_max_cases, settings.seed, min_val_cases)
    workers = settings.num_workers
    return SiteData(
        train_cases=train_cases,
        val_cases=val_cases,
        train_loader=DataLoader(train_ds, batch_size=settings.batch_size, shuffle=True, num_workers=workers),
        val_loader=DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=workers),
        round_val_loader=DataLoader(
            torch.utils.data.Subset(val_ds, subset), batch_size=1, shuffle=False, num_workers=workers
        ),
        round_val_indices=subset,
        cache_dir=cache_dir,
        problems=problems,
    )
