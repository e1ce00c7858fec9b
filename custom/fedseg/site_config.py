"""What a site decides for itself: its folders, what it lets a job do, and the caps on a job's settings.

A job never names these. Each site reads them from its own kit, ``local/fedseg_site.json`` (written by
``fedseg install-policy``, edited by the hospital's IT); what that file leaves out takes the default
below, and for the folders and the two simulator/POC switches the environment of the process that started
the site (``FEDSEG_DATA_ROOT``, ``FEDSEG_CACHE_DIR``, ``FEDSEG_ALLOW_DRILLS``, ``FEDSEG_ALLOW_SCAFFOLD``):
the FLARE simulator and POC set those for their local sites, which run on the researcher's own machine.

Every key is one field of ``SiteConfig`` with its default; the caps are checked against a job's
``TrainingSettings`` by ``SiteConfig.refusal``, each refusal one line naming the site, the setting, its
value, the cap and the file. The defaults take the ``demo`` and ``fets2022`` profiles.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields

from fedseg.cache import CACHE_DIR_ENV
from fedseg.data import DATA_ROOT_ENV
from fedseg.settings import TrainingSettings

SITE_CONFIG_FILE = "fedseg_site.json"  # in the kit's local/ folder, beside FLARE's own site policies
ALLOW_DRILLS_ENV = "FEDSEG_ALLOW_DRILLS"
ALLOW_SCAFFOLD_ENV = "FEDSEG_ALLOW_SCAFFOLD"
_TRUE = ("1", "true", "yes", "on")


def _cores() -> int:
    return os.cpu_count() or 1


def _cap(default: int, setting: str, measure: Callable[[TrainingSettings], int], help_text: str):
    """A cap: the largest ``measure(settings)`` (shown as ``setting``) a job may ask of this site."""
    return field(default=default, metadata={"cap": (setting, measure), "help": help_text})


def _threads(settings: TrainingSettings) -> int:
    return settings.threads or _cores()  # 0: torch's default, every core


@dataclass(frozen=True)
class SiteConfig:
    """A site's own settings (the keys of ``fedseg_site.json``); ``source`` says where they were read."""

    data_root: str | None = field(default=None, metadata={"env": DATA_ROOT_ENV})
    cache_dir: str | None = field(default=None, metadata={"env": CACHE_DIR_ENV})
    allow_drills: bool = field(default=False, metadata={"env": ALLOW_DRILLS_ENV})
    # NVFlare's Scaffold sends its control deltas in the result's meta, where no privacy filter looks
    allow_scaffold: bool = field(default=False, metadata={"env": ALLOW_SCAFFOLD_ENV})
    # cross-site evaluation's submit_model: the site's full local model, sent as WEIGHTS and forwarded to
    # the other sites; the privacy filter acts on WEIGHT_DIFF only
    share_local_model: bool = False
    max_local_steps: int = _cap(500, "local_steps", lambda s: s.local_steps, "optimiser steps per round")
    max_local_epochs: int = _cap(20, "local_epochs", lambda s: s.local_epochs, "passes over the data per round")
    max_crop: int = _cap(192, "crop", lambda s: max(s.crop), "voxels per axis of a crop (and sliding window)")
    max_channels: int = _cap(256, "channels", lambda s: max(s.channels), "channels of the widest U-Net level")
    max_levels: int = _cap(5, "channels (levels)", lambda s: len(s.channels), "U-Net levels")
    max_crops_per_step: int = _cap(
        8, "batch_size x samples_per_case", lambda s: s.batch_size * s.samples_per_case, "crops in one step"
    )
    max_sw_batch_size: int = _cap(8, "sw_batch_size", lambda s: s.sw_batch_size, "sliding windows per pass")
    max_num_workers: int = _cap(4, "num_workers", lambda s: s.num_workers, "DataLoader worker processes")
    max_threads: int = _cap(0, "threads", _threads, "torch threads (0: this machine's cores)")
    max_cache_ram_mb: int = _cap(8192, "cache_ram_mb", lambda s: s.cache_ram_mb, "decoded cases kept in RAM")
    # per-round validation scores at least this many cases (all of them where the site has fewer), and no
    # spread (sd) leaves the site for fewer: a round's Dice never describes one chosen patient
    min_val_cases: int = 8
    source: str = "environment"

    @classmethod
    def keys(cls) -> dict[str, type]:
        """The keys ``fedseg_site.json`` may hold, with their JSON type."""
        kinds = {"str | None": str, "bool": bool, "int": int}
        return {f.name: kinds[f.type] for f in fields(cls) if f.name != "source"}

    @classmethod
    def load(cls, local_dir: str | None = None) -> SiteConfig:
        """``<local_dir>/fedseg_site.json`` where it exists; the environment, then the defaults, for the rest."""
        from_file: dict = {}
        source = "environment"
        path = os.path.join(local_dir, SITE_CONFIG_FILE) if local_dir else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                try:
                    from_file = json.load(f)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(from_file, dict):
                raise ValueError(f"{path}: expected a JSON object")
            keys = cls.keys()
            unknown = sorted(set(from_file) - set(keys))
            if unknown:
                raise ValueError(f"{path}: unknown setting(s) {unknown}; expected {', '.join(keys)}")
            for name, value in from_file.items():
                if not _of_type(value, keys[name]):
                    raise ValueError(f"{path}: {name} {value!r} is not {_KIND_WORDS[keys[name]]}")
            source = path
        values = {}
        for f in fields(cls):
            env = f.metadata.get("env")
            if f.name in from_file and not (f.type == "str | None" and not from_file[f.name]):
                values[f.name] = from_file[f.name]
            elif env and f.type == "bool":
                values[f.name] = os.environ.get(env, "").strip().lower() in _TRUE
            elif env:
                values[f.name] = os.environ.get(env) or None
        return cls(**values, source=source)

    def to_json(self) -> dict:
        values = asdict(self)
        values.pop("source")
        return values

    def where(self) -> str:
        """The file a refusal names: the site's own, or where it would be (defaults and environment only)."""
        return self.source if self.source != "environment" else f"this site's default; no local/{SITE_CONFIG_FILE}"

    def refusal(self, settings: TrainingSettings) -> str | None:
        """Why this site refuses a job with these settings (the first cap it goes over), or None."""
        for f in fields(self):
            if "cap" not in f.metadata:
                continue
            setting, measure = f.metadata["cap"]
            cap = getattr(self, f.name) or (_cores() if f.name == "max_threads" else 0)
            value = measure(settings)
            if value > cap:
                return f"{setting} {value} is over this site's cap {f.name} {cap} ({self.where()})"
        if 0 < settings.val_max_cases < self.min_val_cases:
            return (
                f"val_max_cases {settings.val_max_cases} is under this site's minimum min_val_cases "
                f"{self.min_val_cases} ({self.where()}; 0 scores every case)"
            )
        return None


_KIND_WORDS = {str: "a folder (a string)", bool: "true or false", int: "an integer >= 0"}


def _of_type(value, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind is str:
        return value is None or isinstance(value, str)
    return isinstance(value, bool)


@contextlib.contextmanager
def site_environment(
    data_root: str | None = None, cache_dir: str | None = None, allow_drills: bool = False, allow_scaffold: bool = False
) -> Iterator[None]:
    """Set the site variables for the local site processes started inside (simulator, POC), then restore.

    A value left as None keeps what this process's environment already says.
    """
    wanted = {
        DATA_ROOT_ENV: data_root and os.path.abspath(data_root),
        CACHE_DIR_ENV: cache_dir and os.path.abspath(cache_dir),
        ALLOW_DRILLS_ENV: "1" if allow_drills else None,
        ALLOW_SCAFFOLD_ENV: "1" if allow_scaffold else None,
    }
    saved = {key: os.environ.get(key) for key in wanted}
    try:
        os.environ.update({key: value for key, value in wanted.items() if value is not None})
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
