"""FeTS2022 training folder + partitioning CSV -> one prepared folder per site, every case checked.

For each chosen partition a folder named as its FLARE client receives the subjects that pass every check
(``fedseg.data_prep.checks``) in the chosen mode (``fedseg.data_prep.materialise``), a MONAI-style ``datalist.json``
(seeded training/validation split) and a ``manifest.json`` (subjects, split, source file sizes and
mtimes, crops). The run writes ``rejected.csv`` (subject, file, reason) and ``prep_summary.json`` beside
the site folders and returns what it did.

Guarantees: nothing is written under the source folder; every output is written atomically; a subject
whose files are unchanged since the last run (same sizes and mtimes) is not read again, and one already
in the site folder in the same mode is not written again; a run that is killed resumes where it stopped.

This module chooses the partitions, accepts or rejects each subject and splits each site; the checks are read
through ``fedseg.data_prep.check_cache``, each site folder is written by ``fedseg.data_prep.site_folder``, and
the run's report is ``fedseg.data_prep.prep_summary``.
"""

from __future__ import annotations

import hashlib
import os
import time

from fedseg.data_prep.check_cache import CACHE_NAME, CACHE_VERSION, check_subjects  # noqa: F401
from fedseg.data_prep.checks import Problem, SubjectCheck
from fedseg.data_prep.materialise import MODES
from fedseg.data_prep.partitions import PartitionCsvError, PartitionTable, parse_partitions
from fedseg.data_prep.prep_summary import (  # noqa: F401  (importable from here, as before the split)
    REJECTED_NAME,
    SUMMARY_NAME,
    PrepResult,
    format_summary,
    write_rejected,
    write_summary,
)
from fedseg.data_prep.site_folder import MANIFEST_NAME, SitePlan, SiteResult, datalist_entry, write_site  # noqa: F401

DEFAULT_CSV = "partitioning_1.csv"


class PrepError(ValueError):
    """The run cannot produce any usable site (bad arguments, unusable CSV, no data)."""


def split_subjects(subjects: list[str], validation_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split, stable as subjects come and go: rank by a hash of (seed, subject), validation first.

    At least one validation and one training subject when there are two or more. Adding or removing a
    subject moves at most one other subject across the split.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {validation_fraction}")
    order = sorted(set(subjects), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n_val = min(max(1, round(len(order) * validation_fraction)), len(order) - 1) if len(order) > 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def site_name(template: str, index: int, partition: int) -> str:
    """Site folder name from a template with ``{n}`` (1-based site index) and/or ``{partition}``."""
    try:
        return template.format(n=index, partition=partition)
    except (KeyError, IndexError, ValueError) as exc:
        raise PrepError(f"site name template {template!r} is invalid ({exc}); use {{n}} and/or {{partition}}") from None


def choose_partitions(table: PartitionTable, partitions: list[int] | None, largest: int | None) -> list[int]:
    """All partitions (CSV order), the listed ids, or the ``largest`` N by subject count (then in id order)."""
    if partitions and largest:
        raise PrepError("give either a list of partitions or --largest N, not both")
    if largest:
        if largest < 1:
            raise PrepError(f"--largest must be >= 1, got {largest}")
        ranked = sorted(table.partitions, key=lambda p: (-len(table.partitions[p]), p))[:largest]
        return sorted(ranked)
    if partitions:
        unknown = [p for p in partitions if p not in table.partitions]
        if unknown:
            raise PrepError(f"partitions {unknown} are not in {table.path} (it has {list(table.partitions)})")
        return list(dict.fromkeys(partitions))
    return list(table.partitions)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def prepare(
    data_dir: str,
    out_dir: str,
    csv_path: str | None = None,
    partitions: list[int] | None = None,
    largest: int | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    name_template: str = "site-{n}",
    mode: str = "link",
    workers: int | None = None,
    strict: bool = False,
    min_subjects: int = 2,
    show_progress: bool = True,
) -> PrepResult:
    """Prepare one site folder per chosen partition; see the module docstring for the guarantees."""
    started = time.monotonic()
    data_dir, out_dir = _checked_folders(data_dir, out_dir, mode)
    workers = max(1, workers or os.cpu_count() or 1)
    csv_path = csv_path or os.path.join(data_dir, DEFAULT_CSV)
    table = parse_partitions(csv_path)  # PartitionCsvError when unusable
    chosen = choose_partitions(table, partitions, largest)
    rejected: list[Problem] = [Problem(p.subject, os.path.basename(csv_path), "csv", p.reason) for p in table.problems]
    on_disk = {n for n in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, n)) and not n.startswith(".")}
    warnings = _unlisted_warning(on_disk, table, csv_path)

    os.makedirs(out_dir, exist_ok=True)
    checks, read, reused = check_subjects(table, chosen, on_disk, data_dir, out_dir, workers, show_progress, rejected)
    plans = _plan_sites(
        table, chosen, on_disk, checks, name_template, validation_fraction, seed, min_subjects, rejected, warnings
    )

    result = PrepResult([], rejected, warnings, read=read, reused=reused)
    write_rejected(os.path.join(out_dir, REJECTED_NAME), rejected, table.partition_of())
    if strict and rejected:
        result.seconds = time.monotonic() - started
        write_summary(out_dir, result, data_dir, csv_path, mode, strict=True)
        raise PrepError(
            f"--strict: {len(rejected)} rejection(s), site folders left unchanged; see {os.path.join(out_dir, REJECTED_NAME)}"
        )

    for plan in plans:
        site, written = write_site(
            plan, out_dir, data_dir, csv_path, checks, mode, seed, validation_fraction, workers, show_progress
        )
        result.sites.append(site)
        result.written += written

    result.seconds = time.monotonic() - started
    write_summary(out_dir, result, data_dir, csv_path, mode, strict=strict)
    if not result.sites:
        raise PrepError(f"no site has usable data; see {os.path.join(out_dir, REJECTED_NAME)}")
    return result


def _checked_folders(data_dir: str, out_dir: str, mode: str) -> tuple[str, str]:
    """Absolute (data, output) folders, refusing an unknown mode, a missing source or an output inside it."""
    if mode not in MODES:
        raise PrepError(f"unknown mode {mode!r}; choose one of {MODES}")
    data_dir, out_dir = os.path.abspath(data_dir), os.path.abspath(out_dir)
    if not os.path.isdir(data_dir):
        raise PrepError(f"{data_dir}: no such data folder")
    if _inside(out_dir, data_dir):
        raise PrepError(f"output folder {out_dir} is inside the source folder {data_dir}; sources are never written")
    return data_dir, out_dir


def _unlisted_warning(on_disk: set[str], table: PartitionTable, csv_path: str) -> list[str]:
    unlisted = sorted(on_disk - set(table.partition_of()))
    if not unlisted:
        return []
    shown = ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else "")
    return [f"{len(unlisted)} subject folder(s) on disk are in no partition of {os.path.basename(csv_path)}: {shown}"]


def _plan_sites(
    table: PartitionTable,
    chosen: list[int],
    on_disk: set[str],
    checks: dict[str, SubjectCheck],
    name_template: str,
    validation_fraction: float,
    seed: int,
    min_subjects: int,
    rejected: list[Problem],
    warnings: list[str],
) -> list[SitePlan]:
    """Accept or reject each checked subject and split each partition with enough of them."""
    plans = []
    for index, partition in enumerate(chosen, start=1):
        present = [s for s in table.partitions[partition] if s in checks]
        for sid in present:
            rejected.extend(checks[sid].problems)
        accepted = [s for s in present if checks[s].ok]
        if len(accepted) < min_subjects:
            for sid in accepted:
                rejected.append(
                    Problem(
                        sid,
                        "",
                        "too-few",
                        f"partition {partition} has {len(accepted)} usable subject(s); "
                        f"at least {min_subjects} are needed for a training/validation split",
                    )
                )
            warnings.append(f"partition {partition}: no site folder ({len(accepted)} usable subjects)")
            continue
        training, validation = split_subjects(accepted, validation_fraction, seed)
        missing = [s for s in table.partitions[partition] if s not in on_disk]
        plans.append(SitePlan(site_name(name_template, index, partition), partition, training, validation, missing))
    return plans


def prepare_sites(
    data_dir: str,
    out_dir: str,
    csv_path: str | None = None,
    partitions: list[int] | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    name_template: str = "site-{n}",
    **options,
) -> list[SiteResult]:
    """``prepare`` for callers that only want the sites (the demo, tests); no progress bars by default."""
    options.setdefault("show_progress", False)
    return prepare(
        data_dir,
        out_dir,
        csv_path=csv_path,
        partitions=partitions,
        validation_fraction=validation_fraction,
        seed=seed,
        name_template=name_template,
        **options,
    ).sites


__all__ = ["prepare", "prepare_sites", "PrepError", "PartitionCsvError", "split_subjects", "format_summary"]
