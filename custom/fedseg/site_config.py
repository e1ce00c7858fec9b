"""What a site decides for itself: where its data and cache are, and whether it allows resilience drills.

A job never names these. Each site reads them from its own kit, ``local/fedseg_site.json`` (written by
``fedseg install-policy``, edited by the hospital's IT), and, for what that file leaves out, from the
environment of the process that started the site (``FEDSEG_DATA_ROOT``, ``FEDSEG_CACHE_DIR``,
``FEDSEG_ALLOW_DRILLS``): the FLARE simulator and POC set those for their local sites.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from fedseg.cache import CACHE_DIR_ENV
from fedseg.data import DATA_ROOT_ENV

SITE_CONFIG_FILE = "fedseg_site.json"  # in the kit's local/ folder, beside FLARE's own site policies
ALLOW_DRILLS_ENV = "FEDSEG_ALLOW_DRILLS"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class SiteConfig:
    """A site's own settings; ``source`` says where they were read, for error messages."""

    data_root: str | None = None
    cache_dir: str | None = None
    allow_drills: bool = False
    source: str = "environment"

    @classmethod
    def load(cls, local_dir: str | None = None) -> SiteConfig:
        """``<local_dir>/fedseg_site.json`` where it exists, the environment for anything it leaves out."""
        from_file: dict = {}
        source = "environment"
        path = os.path.join(local_dir, SITE_CONFIG_FILE) if local_dir else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                try:
                    from_file = json.load(f)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: not valid JSON ({exc})") from None
            unknown = sorted(set(from_file) - {"data_root", "cache_dir", "allow_drills"})
            if unknown:
                raise ValueError(f"{path}: unknown setting(s) {unknown}; expected data_root, cache_dir, allow_drills")
            source = path
        env_drills = os.environ.get(ALLOW_DRILLS_ENV, "").strip().lower() in _TRUE
        return cls(
            data_root=from_file.get("data_root") or os.environ.get(DATA_ROOT_ENV) or None,
            cache_dir=from_file.get("cache_dir") or os.environ.get(CACHE_DIR_ENV) or None,
            allow_drills=bool(from_file["allow_drills"]) if "allow_drills" in from_file else env_drills,
            source=source,
        )

    def to_json(self) -> dict:
        values = asdict(self)
        values.pop("source")
        return values


@contextlib.contextmanager
def site_environment(
    data_root: str | None = None, cache_dir: str | None = None, allow_drills: bool = False
) -> Iterator[None]:
    """Set the site variables for the local site processes started inside (simulator, POC), then restore.

    A value left as None keeps what this process's environment already says.
    """
    wanted = {
        DATA_ROOT_ENV: data_root and os.path.abspath(data_root),
        CACHE_DIR_ENV: cache_dir and os.path.abspath(cache_dir),
        ALLOW_DRILLS_ENV: "1" if allow_drills else None,
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
