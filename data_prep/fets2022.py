"""FeTS2022 training folder + partitioning CSV -> one prepared folder per site (thin version: link mode).

Each site folder is named as its FLARE client and holds a symlink per subject (sources are never copied or
modified) and a MONAI-style ``datalist.json`` with a seeded training/validation split.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from data_prep.atomic import atomic_directory, write_json
from data_prep.layout import MODALITIES, SEG, subject_file
from data_prep.partitions import read_partitions


@dataclass
class SiteResult:
    site: str
    partition: int
    training: int
    validation: int
    missing: list[str]


def split_subjects(subjects: list[str], validation_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split: at least one validation and one training subject when there are two or more."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {validation_fraction}")
    order = sorted(subjects)
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * validation_fraction)), len(order) - 1) if len(order) > 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def datalist_entry(sid: str) -> dict:
    """One datalist item with paths relative to the site folder (where the subject is linked)."""
    return {
        "subject": sid,
        "image": [subject_file("", sid, m) for m in MODALITIES],
        "label": subject_file("", sid, SEG),
    }


def site_name(template: str, index: int, partition: int) -> str:
    """Site folder name from a template with ``{n}`` (1-based site index) and/or ``{partition}``."""
    return template.format(n=index, partition=partition)


def prepare_sites(
    data_dir: str,
    out_dir: str,
    csv_path: str | None = None,
    partitions: list[int] | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    name_template: str = "site-{n}",
) -> list[SiteResult]:
    """Prepare one site folder per selected partition; returns what each site received."""
    data_dir = os.path.abspath(data_dir)
    table = read_partitions(csv_path or os.path.join(data_dir, "partitioning_1.csv"))
    chosen = list(table) if not partitions else partitions
    unknown = [p for p in chosen if p not in table]
    if unknown:
        raise ValueError(f"partitions {unknown} are not in the CSV (it has {list(table)})")
    results = []
    for index, partition in enumerate(chosen, start=1):
        name = site_name(name_template, index, partition)
        present = [s for s in table[partition] if os.path.isdir(os.path.join(data_dir, s))]
        missing = [s for s in table[partition] if s not in present]
        training, validation = split_subjects(present, validation_fraction, seed)
        with atomic_directory(os.path.join(out_dir, name)) as tmp:
            for sid in present:
                os.symlink(os.path.join(data_dir, sid), os.path.join(tmp, sid))
            write_json(
                os.path.join(tmp, "datalist.json"),
                {
                    "site": name,
                    "partition": partition,
                    "source": data_dir,
                    "modalities": list(MODALITIES),
                    "training": [datalist_entry(s) for s in training],
                    "validation": [datalist_entry(s) for s in validation],
                },
            )
        results.append(SiteResult(name, partition, len(training), len(validation), missing))
    return results
