"""A site's data: its MONAI datalist, the cached cases, the augmentations and the loaders.

A prepared site folder holds ``datalist.json`` in MONAI's decathlon format: ``training`` and ``validation``
lists of ``{"image": [t1, t1ce, t2, flair], "label": seg}`` with paths relative to the folder. The four
modalities are stacked as channels in ``regions.MODALITIES`` order; the label becomes TC/WT/ET masks.
Decoded cases come from the site's disk cache (``fedseg.cache``), so memory does not grow with the
number of cases; per-round validation reads a fixed, seeded subset of at most ``val_max_cases`` cases
(never fewer than the site's ``min_val_cases``). A training case is augmented in two stages: on the host,
where the loader reads it (``HOST_STAGE``: padding and the tumour/background voxel lists), then on the
training device (crops, regions, flips, intensity jitter: ``SiteData.device_batch``), so that a GPU site
moves the compact float16 case rather than float32 crops and works on it with the GPU; ``prefetched`` makes
the batches in a thread, ahead of the training step. Log lines give counts, never a subject id or a path: a
job's log may be read off the site; which cases were left out, and why, goes to ``LEFT_OUT_FILE`` in the cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from monai.data import DataLoader, Dataset, MetaTensor, load_decathlon_datalist
from monai.transforms import (
    CastToTyped,
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
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


# the first transforms of ``train_transforms`` run where the loader reads the case (``HostStage``), the rest
# on the training device (``SiteData.device_batch``)
HOST_STAGE = 2
INDEX_KEYS = ("label_fg_indices", "label_bg_indices")  # what FgBgToIndicesd writes for the key "label"


def train_transforms(crop_size: Sequence[int], samples_per_case: int = 2) -> Compose:
    """Random crops around tumour and background, flips and intensity jitter, on a cached case.

    The cached case is cropped before it becomes float32 and TC/WT/ET masks: the same crops, flips and values
    as converting the whole volume first (the crop centres come from the voxels where label > 0 and image > 0,
    which the conversion does not change; each random transform draws from its own seeded stream, in this
    order), at a fraction of the work. The first ``HOST_STAGE`` transforms need the whole volume on the host.
    """
    crop_size = list(crop_size)
    return Compose(
        [
            SpatialPadd(keys=["image", "label"], spatial_size=crop_size),
            FgBgToIndicesd(keys="label", image_key="image", image_threshold=0),
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=crop_size,
                pos=1,
                neg=1,
                num_samples=samples_per_case,
                image_key="image",
                image_threshold=0,
                fg_indices_key=INDEX_KEYS[0],
                bg_indices_key=INDEX_KEYS[1],
            ),
            *to_regions(),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )


class HostStage(Dataset):
    """Training cases through the host stage of their augmentation (``transform`` up to ``HOST_STAGE``).

    It holds the whole augmentation as its ``transform``: MONAI's DataLoader seeds a dataset's random
    transforms by walking its attributes (``data``, then ``transform``), so they are seeded as when the loader
    ran every transform; the rest runs in the training process (``SiteData.device_batch``), never in a worker.
    """

    def _transform(self, index: int) -> dict:
        return self.transform(self.data[index], end=HOST_STAGE)


def _cases(batch: list[dict]) -> list[dict]:
    """The loader's collate: a batch stays a list of host-stage cases (their boxes differ in size)."""
    return batch


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
    augment: Compose  # the training augmentation, whose device stage ``device_batch`` runs

    def cache_bytes(self) -> int:
        return cache_size_bytes(self.cache_dir)

    def device_batch(self, cases: list[dict], device: torch.device, non_blocking: bool = False) -> dict:
        """A training batch on ``device`` from the loader's host-stage cases: each case's image and label moved
        (the compact float16 and uint8 form), the rest of its augmentation run there, the crops stacked in order."""
        samples = []
        for case in cases:
            moved = {
                k: v.to(device, non_blocking=non_blocking) if k in ("image", "label") else v for k, v in case.items()
            }
            out = self.augment(moved, start=HOST_STAGE)
            samples += out if isinstance(out, list) else [out]
        return {key: torch.stack([_plain(s[key]) for s in samples]) for key in ("image", "label")}


def _plain(value: torch.Tensor) -> torch.Tensor:
    """A MetaTensor's plain tensor (the network needs no affine, and plain tensors skip MONAI's bookkeeping)."""
    return value.as_tensor() if isinstance(value, MetaTensor) else value


def prefetched(batches: Iterable, prepare: Callable, device: torch.device, depth: int = 2) -> Iterator:
    """``prepare(item)`` of each item of ``batches``, made in a background thread up to ``depth`` ahead, in order.

    The thread takes from ``batches`` what a loop over it would (``batches`` itself decides when to stop) and
    prepares the items in order, so the loader's shuffles and the augmentation's random streams are those of a
    loop without it. On a GPU it pins each item and prepares it on a CUDA stream of its own, so that the copy and
    the device stage overlap the training step; the consumer's stream waits for the item before using it. A
    consumer that stops early (an exception) stops the thread at its next item.
    """
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop, end, cuda = threading.Event(), object(), device.type == "cuda"

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            stream = torch.cuda.Stream(device) if cuda else None
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for item in batches:
                    ready = prepare(_pinned(item) if cuda else item)
                    if cuda:
                        ready = (ready, torch.cuda.Event())
                        ready[1].record(stream)
                    if not put(ready):
                        return
            put(end)
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer's thread
            put(_Failed(exc))

    worker = threading.Thread(target=produce, name="fedseg-prefetch", daemon=True)
    worker.start()
    try:
        while (item := slots.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield _arrived(*item, device) if cuda else item
    finally:
        stop.set()
        worker.join(timeout=60)  # it stops at its next item; a loader that hangs must not hang the site too


def _arrived(batch: dict, made: torch.cuda.Event, device: torch.device) -> dict:
    """A batch made on the thread's stream, handed to the consumer's: wait for it, and keep its memory until used."""
    current = torch.cuda.current_stream(device)
    current.wait_event(made)
    for value in batch.values():
        value.record_stream(current)
    return batch


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _pinned(cases: list[dict]) -> list[dict]:
    """Host-stage cases with image and label in page-locked memory (an asynchronous copy to the GPU)."""
    return [{k: v.pin_memory() if k in ("image", "label") else v for k, v in case.items()} for case in cases]


def _train_loader(train_ds: HostStage, batch_size: int, workers: int) -> DataLoader:
    """The training loader; its augmentation seeded as a loader without workers seeds it, whatever ``workers``.

    MONAI's DataLoader seeds the dataset's random transforms (from torch's generator, which it then rewinds)
    only when it has no workers; workers only ever run the host stage, which draws nothing, so with this the
    same seed gives the same training for any number of workers.
    """
    single = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=0, collate_fn=_cases)
    if workers == 0:
        return single
    return DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=_cases)


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
    train_ds = HostStage(train_cases, augment)
    val_ds = Dataset(val_cases, Compose(to_regions()))
    subset = validation_subset(len(val_cases), settings.val_max_cases, settings.seed, min_val_cases)
    workers = settings.num_workers
    return SiteData(
        train_cases=train_cases,
        val_cases=val_cases,
        train_loader=_train_loader(train_ds, settings.batch_size, workers),
        val_loader=DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=workers),
        round_val_loader=DataLoader(
            torch.utils.data.Subset(val_ds, subset), batch_size=1, shuffle=False, num_workers=workers
        ),
        round_val_indices=subset,
        cache_dir=cache_dir,
        problems=problems,
        augment=augment,
    )
