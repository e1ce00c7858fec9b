"""A site's decoded cases on its own disk, so that its memory does not grow with its number of cases.

Decoding one full-size FeTS2022 case (four 240x240x155 ``.nii.gz`` modalities and the seg) takes 1 to 2 s
on a CPU; holding every decoded case in RAM, as ``CacheDataset`` does, needs 162 MiB per case (82 GiB for
partitioning_1's largest institution). Here each case is decoded once, cropped to the brain's box,
normalised and stored compactly (float16 image, uint8 label: about 30 MiB) in the site's cache folder;
later reads take milliseconds (benchmark docs, ``bench.site_scale``). Only the cases of the current batch
are in memory, plus optionally up to ``ram_budget_mb`` of decoded cases.

The idea is MONAI's ``PersistentDataset``; the differences are what a hospital site needs:
- the key is the case's file contents' identity (path, size, modification time of each of its five
  files) plus ``CACHE_FORMAT``: a changed or replaced source file is decoded again, never served stale;
- a cache file is written to a temporary name in the cache folder itself and renamed (atomic on one
  file system; MONAI writes via the system temp folder and ``shutil.move``, which copies across file
  systems), so a killed process or a full disk never leaves a half-written file under a valid name;
- a full disk is one warning line (no folder or subject named: a job's log may be read off the site);
  training goes on, the rest of the cases are decoded from their NIfTI files each time;
- a case that cannot be decoded is named with its reason and left out by ``warm``; the rest go on.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
)

from fedseg.atomic import atomic_path

logger = logging.getLogger("fedseg.cache")

# Bump when the decoded form changes (transforms, dtypes, keys): every older cache file is then ignored.
CACHE_FORMAT = "fedseg-case-v1"
CACHE_SUFFIX = ".case.pt"
CACHE_DIR_ENV = "FEDSEG_CACHE_DIR"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class CaseError(ValueError):
    """A case that cannot be decoded (one line: which case, and why)."""


def case_name(item: dict) -> str:
    """The subject id of a datalist item (the folder of its first image)."""
    first = item["image"][0] if isinstance(item["image"], (list, tuple)) else item["image"]
    return os.path.basename(os.path.dirname(first)) or os.path.basename(first)


def case_files(item: dict) -> list[str]:
    images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
    return [*images, *([item["label"]] if "label" in item else [])]


def case_key(item: dict) -> str:
    """Identity of a case's decoded form: its files' paths, sizes and modification times, and the format."""
    identity = [CACHE_FORMAT]
    for path in case_files(item):
        try:
            status = os.stat(path)  # follows a prepared site's symlinks to the source files
        except OSError as exc:
            raise CaseError(f"case {case_name(item)}: cannot read {path} ({exc.strerror or exc})") from exc
        identity.append([os.path.realpath(path), status.st_size, status.st_mtime_ns])
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def decode_transforms(with_label: bool = True) -> Compose:
    """NIfTI files -> the compact, deterministic form that is cached.

    The brain's box (non-zero voxels of any modality) is kept: the background outside it carries no
    tumour and no intensity statistics (normalisation is over non-zero voxels), and it is half of a
    FeTS volume. Images are z-scored per channel over the brain and stored as float16 (the z-scores need
    no more precision), the seg as its uint8 labels; ``spacing`` travels for HD95 in millimetres.
    """
    keys = ["image", "label"] if with_label else ["image"]
    return Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            EnsureTyped(keys=keys, track_meta=True),
            CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            _compact,
        ]
    )


def _compact(data: dict) -> dict:
    out = {
        "image": data["image"].as_tensor().to(torch.float16).contiguous(),
        "spacing": torch.as_tensor(data["image"].pixdim, dtype=torch.float32),
    }
    if "label" in data:
        out["label"] = data["label"].as_tensor().to(torch.uint8).contiguous()
    return out


def case_bytes(case: dict) -> int:
    return sum(v.numel() * v.element_size() for v in case.values() if isinstance(v, torch.Tensor))


class CaseCache(torch.utils.data.Dataset):
    """Decoded cases of one list of datalist items, from the site's disk cache (made on first use).

    ``folder`` None: no disk cache (every read decodes; only the RAM budget caches).
    """

    def __init__(
        self, items: Sequence[dict], folder: str | None, ram_budget_mb: int = 0, with_label: bool = True
    ) -> None:
        self.items = list(items)
        self.folder = os.path.abspath(folder) if folder else None
        self.ram_budget = int(ram_budget_mb) * 2**20
        self.decode = decode_transforms(with_label)
        self._in_ram: dict[int, dict] = {}
        self._ram_used = 0
        self._disk_ok = self.folder is not None
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)

    def __len__(self) -> int:
        return len(self.items)

    def path(self, index: int) -> str | None:
        if not self.folder:
            return None
        item = self.items[index]
        return os.path.join(self.folder, f"{case_name(item)}-{case_key(item)}{CACHE_SUFFIX}")

    def __getitem__(self, index: int) -> dict:
        if index in self._in_ram:
            return dict(self._in_ram[index])
        case = self._read(index)
        if case is None:
            case = self._decode(index)
            self._write(index, case)
        size = case_bytes(case)
        if self._ram_used + size <= self.ram_budget:
            self._in_ram[index] = case
            self._ram_used += size
        return dict(case)

    def _decode(self, index: int) -> dict:
        item = self.items[index]
        try:
            return self.decode(dict(item))
        except Exception as exc:  # noqa: BLE001 - any decoding failure is this case's, named with its reason
            cause = exc.__cause__ or exc  # MONAI wraps the reader's error in "applying transform ..."
            raise CaseError(
                f"case {case_name(item)}: cannot be decoded ({cause.__class__.__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else 'no detail'})"
            ) from exc

    def _read(self, index: int) -> dict | None:
        path = self.path(index)
        if path is None or not os.path.isfile(path):
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable cache file is decoded again, not trusted
            logger.warning("a cache file was unreadable (%s); decoding its case again", exc.__class__.__name__)
            _remove(path)
            return None

    def _write(self, index: int, case: dict) -> None:
        path = self.path(index)
        if path is None or not self._disk_ok:
            return
        try:
            with atomic_path(path) as tmp:
                torch.save(case, tmp)
        except OSError as exc:
            self._disk_ok = False
            why = "is full" if exc.errno in FULL_DISK else f"cannot be written ({exc.strerror or exc})"
            logger.warning(
                "the site's disk cache %s: from now on cases are decoded from their NIfTI files at every read "
                "(slower, same results); free space in the cache folder or set cache_dir (fedseg_site.json) or %s",
                why,
                CACHE_DIR_ENV,
            )

    def warm(self, progress: Callable[[int, int, str], None] | None = None) -> list[str]:
        """Decode and cache every case now; drop the ones that fail. Returns one line per dropped case."""
        problems, keep = [], []
        for index in range(len(self.items)):
            try:
                self[index]
                keep.append(index)
            except (CaseError, OSError) as exc:
                problems.append(str(exc))
            if progress is not None:
                progress(index + 1, len(self.items), case_name(self.items[index]))
        if problems:
            self.items = [self.items[i] for i in keep]
            self._in_ram = {}
            self._ram_used = 0
        return problems

    def prune(self, keep: set[str]) -> int:
        """Remove this folder's case files whose names are not in ``keep`` (stale versions); bytes freed."""
        if not self.folder:
            return 0
        freed = 0
        for name in os.listdir(self.folder):
            if name.endswith(CACHE_SUFFIX) and name not in keep:
                path = os.path.join(self.folder, name)
                freed += os.path.getsize(path)
                _remove(path)
        return freed

    def file_names(self) -> set[str]:
        return {os.path.basename(self.path(i)) for i in range(len(self.items))} if self.folder else set()


def cache_size_bytes(folder: str | None) -> int:
    """Bytes of the case files in a cache folder."""
    if not folder or not os.path.isdir(folder):
        return 0
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(CACHE_SUFFIX))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class Progress:
    """Log a long loop every ``every`` seconds (and at its end): sites show how far caching has got."""

    def __init__(self, label: str, every: float = 10.0) -> None:
        self.label, self.every, self.started, self.last = label, every, time.monotonic(), 0.0

    def __call__(self, done: int, total: int, name: str) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= self.every:
            self.last = now
            logger.info("%s: %d/%d cases, %.0f s", self.label, done, total, now - self.started)  # no subject id
