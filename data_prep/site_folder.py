"""Writing one prepared site folder: its subjects in the chosen mode (only those that changed since the last run),
its MONAI-style ``datalist.json`` and its ``manifest.json`` (subjects, split, source file signatures, crops);
whatever else the folder holds (subjects no longer in the site, a killed run's temporary entries) is removed.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

from fedseg.atomic import write_json
from fedseg.data_prep.checks import KINDS, SubjectCheck
from fedseg.data_prep.layout import MODALITIES, SEG, subject_file
from fedseg.data_prep.materialise import materialise
from fedseg.data_prep.parallel import run_parallel
from fedseg.regions import DATALIST_NAME

MANIFEST_NAME = "manifest.json"


@dataclass
class SitePlan:
    """One site to write: its name, partition and split, and the listed subjects that are not on disk."""

    name: str
    partition: int
    training: list[str]
    validation: list[str]
    missing: list[str]


@dataclass
class SiteResult:
    site: str
    partition: int
    training: int
    validation: int
    missing: list[str] = field(default_factory=list)


def datalist_entry(sid: str) -> dict:
    """One datalist item with paths relative to the site folder: image = the modalities in network order."""
    return {
        "subject": sid,
        "image": [subject_file("", sid, m) for m in MODALITIES],
        "label": subject_file("", sid, SEG),
    }


def write_site(
    plan: SitePlan,
    out_dir: str,
    data_dir: str,
    csv_path: str,
    checks: dict[str, SubjectCheck],
    mode: str,
    seed: int,
    validation_fraction: float,
    workers: int,
    show_progress: bool,
) -> tuple[SiteResult, int]:
    """One site folder: its subjects (only what changed), then its datalist and manifest; (result, written)."""
    site_dir = os.path.join(out_dir, plan.name)
    os.makedirs(site_dir, exist_ok=True)
    _clean_leftovers(site_dir)
    entries, jobs = _unchanged_subjects(plan, site_dir, data_dir, checks, mode)

    def record(job, crop):
        check = job[1]
        entries[check.subject] = {"signature": check.signature, "crop": crop, "dtypes": check.dtypes}

    run_parallel(
        jobs, materialise, workers if mode == "preprocess" else 1, f"{plan.name}: {mode}", show_progress, record
    )
    for sid in entries:
        entries[sid]["split"] = "validation" if sid in plan.validation else "training"
    write_json(os.path.join(site_dir, DATALIST_NAME), _datalist(plan, mode))
    write_json(
        os.path.join(site_dir, MANIFEST_NAME),
        {
            "site": plan.name,
            "partition": plan.partition,
            "mode": mode,
            "source": data_dir,
            "csv": os.path.abspath(csv_path),
            "seed": seed,
            "validation_fraction": validation_fraction,
            "counts": {"training": len(plan.training), "validation": len(plan.validation)},
            "files": list(KINDS),
            "subjects": {s: entries[s] for s in sorted(entries)},
        },
    )
    _remove_stale(site_dir, set(entries) | {DATALIST_NAME, MANIFEST_NAME})
    return SiteResult(plan.name, plan.partition, len(plan.training), len(plan.validation), plan.missing), len(jobs)


def _unchanged_subjects(
    plan: SitePlan, site_dir: str, data_dir: str, checks: dict[str, SubjectCheck], mode: str
) -> tuple[dict[str, dict], list[tuple]]:
    """The manifest entries of the site's subjects already in the folder, unchanged and in ``mode``, and the
    ``materialise`` jobs of the others."""
    previous = _read_manifest(site_dir)
    old_subjects = previous.get("subjects", {}) if previous.get("mode") == mode else {}
    entries: dict[str, dict] = {}
    jobs = []
    for sid in plan.training + plan.validation:
        check = checks[sid]
        old = old_subjects.get(sid)
        if old and old.get("signature") == check.signature and os.path.lexists(os.path.join(site_dir, sid)):
            entries[sid] = dict(old)
        else:
            jobs.append((data_dir, check, site_dir, mode))
    return entries, jobs


def _datalist(plan: SitePlan, mode: str) -> dict:
    return {
        "site": plan.name,
        "partition": plan.partition,
        "mode": mode,
        "modalities": list(MODALITIES),
        "training": [datalist_entry(s) for s in plan.training],
        "validation": [datalist_entry(s) for s in plan.validation],
    }


def _read_manifest(site_dir: str) -> dict:
    path = os.path.join(site_dir, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _clean_leftovers(site_dir: str) -> None:
    """Remove temporary entries a killed run may have left in a site folder."""
    for name in os.listdir(site_dir):
        if name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old")):
            path = os.path.join(site_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def _remove_stale(site_dir: str, keep_names: set[str]) -> None:
    """Remove what the site folder holds beyond ``keep_names``: subjects no longer in this site."""
    for stale in set(os.listdir(site_dir)) - keep_names:
        path = os.path.join(site_dir, stale)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
