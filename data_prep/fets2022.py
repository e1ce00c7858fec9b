"""FeTS2022 training folder + partitioning CSV -> one prepared folder per site, every case checked.

For each chosen partition a folder named as its FLARE client receives the subjects that pass every check
(``fedseg.data_prep.checks``) in the chosen mode (``fedseg.data_prep.materialise``), a MONAI-style ``datalist.json``
(seeded training/validation split) and a ``manifest.json`` (subjects, split, source file sizes and
mtimes, crops). The run writes ``rejected.csv`` (subject, file, reason) and ``prep_summary.json`` beside
the site folders and returns what it did.

Guarantees: nothing is written under the source folder; every output is written atomically; a subject
whose files are unchanged since the last run (same sizes and mtimes) is not read again, and one already
in the site folder in the same mode is not written again; a run that is killed resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from fedseg.atomic import write_json, write_text
from fedseg.data_prep.checks import KINDS, Problem, SubjectCheck, check_subject, signature
from fedseg.data_prep.layout import MODALITIES, SEG, subject_file
from fedseg.data_prep.materialise import MODES, materialise
from fedseg.data_prep.partitions import PartitionCsvError, PartitionTable, parse_partitions
from fedseg.regions import DATALIST_NAME

MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.csv"
SUMMARY_NAME = "prep_summary.json"
CACHE_NAME = ".prep_cache.json"
CACHE_VERSION = 1
DEFAULT_CSV = "partitioning_1.csv"


class PrepError(ValueError):
    """The run cannot produce any usable site (bad arguments, unusable CSV, no data)."""


@dataclass
class SiteResult:
    site: str
    partition: int
    training: int
    validation: int
    missing: list[str] = field(default_factory=list)


@dataclass
class PrepResult:
    sites: list[SiteResult]
    rejected: list[Problem]
    warnings: list[str]
    read: int = 0
    reused: int = 0
    written: int = 0
    seconds: float = 0.0

    def reasons(self) -> Counter:
        return Counter(p.kind for p in self.rejected)


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


def datalist_entry(sid: str) -> dict:
    """One datalist item with paths relative to the site folder: image = the modalities in network order."""
    return {
        "subject": sid,
        "image": [subject_file("", sid, m) for m in MODALITIES],
        "label": subject_file("", sid, SEG),
    }


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


class _CheckCache:
    """Check results keyed by subject, valid while the subject's file signature is unchanged."""

    def __init__(self, out_dir: str, data_dir: str) -> None:
        self.path = os.path.join(out_dir, CACHE_NAME)
        self.data_dir = data_dir
        self.entries: dict[str, dict] = {}
        if os.path.isfile(self.path):
            import json

            try:
                with open(self.path, encoding="utf-8") as f:
                    saved = json.load(f)
                if saved.get("version") == CACHE_VERSION and saved.get("data_dir") == data_dir:
                    self.entries = saved.get("entries", {})
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache only costs a re-read
        self._unsaved = 0
        self._saved_at = time.monotonic()

    def get(self, sid: str, sig: list) -> SubjectCheck | None:
        entry = self.entries.get(sid)
        if entry and entry.get("signature") == sig:
            return SubjectCheck.from_json(entry)
        return None

    def put(self, check: SubjectCheck) -> None:
        self.entries[check.subject] = check.to_json()
        self._unsaved += 1
        if self._unsaved >= 25 or time.monotonic() - self._saved_at > 2.0:
            self.save()

    def save(self) -> None:
        write_json(self.path, {"version": CACHE_VERSION, "data_dir": self.data_dir, "entries": self.entries})
        self._unsaved = 0
        self._saved_at = time.monotonic()


def _progress(total: int, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="case", disable=not enabled or total == 0, file=sys.stderr, leave=True)


def _run_parallel(jobs: list[tuple], fn, workers: int, label: str, show: bool, on_result) -> None:
    """Apply ``fn(*job)`` to every job, in ``workers`` processes (or in this one when workers == 1)."""
    bar = _progress(len(jobs), label, show)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                on_result(job, fn(*job))
                bar.update()
            return
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(fn, *job): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                on_result(futures[future], future.result())
                bar.update()
    finally:
        bar.close()


def _read_manifest(site_dir: str) -> dict:
    import json

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


@dataclass
class SitePlan:
    """One site to write: its name, partition and split, and the listed subjects that are not on disk."""

    name: str
    partition: int
    training: list[str]
    validation: list[str]
    missing: list[str]


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
    checks, read, reused = _check_subjects(table, chosen, on_disk, data_dir, out_dir, workers, show_progress, rejected)
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
        site, written = _write_site(
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


def _check_subjects(
    table: PartitionTable,
    chosen: list[int],
    on_disk: set[str],
    data_dir: str,
    out_dir: str,
    workers: int,
    show_progress: bool,
    rejected: list[Problem],
) -> tuple[dict[str, SubjectCheck], int, int]:
    """Check every subject of the chosen partitions, reusing checks of unchanged files; (checks, read, reused)."""
    cache = _CheckCache(out_dir, data_dir)
    checks: dict[str, SubjectCheck] = {}
    to_read: list[tuple] = []
    for partition in chosen:
        for sid in table.partitions[partition]:
            if sid not in on_disk:
                rejected.append(
                    Problem(sid, "", "absent", f"listed in partition {partition} but no folder {sid} on disk")
                )
                continue
            cached = cache.get(sid, signature(data_dir, sid))
            if cached is not None:
                checks[sid] = cached
            else:
                to_read.append((data_dir, sid))
    reused = len(checks)

    def keep(job, check):
        checks[check.subject] = check
        cache.put(check)

    _run_parallel(to_read, check_subject, workers, "checking subjects", show_progress, keep)
    cache.save()
    return checks, len(to_read), reused


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


def _write_site(
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

    def record(job, crop):
        check = job[1]
        entries[check.subject] = {"signature": check.signature, "crop": crop, "dtypes": check.dtypes}

    _run_parallel(
        jobs, materialise, workers if mode == "preprocess" else 1, f"{plan.name}: {mode}", show_progress, record
    )
    for sid in entries:
        entries[sid]["split"] = "validation" if sid in plan.validation else "training"
    write_json(
        os.path.join(site_dir, DATALIST_NAME),
        {
            "site": plan.name,
            "partition": plan.partition,
            "mode": mode,
            "modalities": list(MODALITIES),
            "training": [datalist_entry(s) for s in plan.training],
            "validation": [datalist_entry(s) for s in plan.validation],
        },
    )
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


def _remove_stale(site_dir: str, keep_names: set[str]) -> None:
    """Remove what the site folder holds beyond ``keep_names``: subjects no longer in this site."""
    for stale in set(os.listdir(site_dir)) - keep_names:
        path = os.path.join(site_dir, stale)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def write_rejected(path: str, rejected: list[Problem], partition_of: dict[str, int]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["subject", "file", "reason", "kind", "partition"])
    for p in rejected:
        writer.writerow([p.subject, p.file, p.reason, p.kind, partition_of.get(p.subject, "")])
    write_text(path, buffer.getvalue())


def write_summary(out_dir: str, result: PrepResult, data_dir: str, csv_path: str, mode: str, strict: bool) -> None:
    write_json(
        os.path.join(out_dir, SUMMARY_NAME),
        {
            "source": data_dir,
            "csv": os.path.abspath(csv_path),
            "mode": mode,
            "strict": strict,
            "sites": [vars(s) for s in result.sites],
            "rejected": len(result.rejected),
            "rejected_by_reason": dict(result.reasons()),
            "warnings": result.warnings,
            "subjects_read": result.read,
            "subjects_reused": result.reused,
            "subjects_written": result.written,
            "seconds": result.seconds,
        },
    )


def format_summary(result: PrepResult) -> str:
    """The printed summary: sites and their subjects, rejections by reason, warnings."""
    lines = [f"{'site':<16}{'partition':>10}{'training':>10}{'validation':>12}"]
    for s in result.sites:
        lines.append(f"{s.site:<16}{s.partition:>10}{s.training:>10}{s.validation:>12}")
    total = sum(s.training + s.validation for s in result.sites)
    lines.append(
        f"{len(result.sites)} sites, {total} subjects prepared "
        f"({result.read} read, {result.reused} unchanged since the last run, {result.written} written) "
        f"in {result.seconds:.1f} s"
    )
    if result.rejected:
        by_reason = ", ".join(f"{kind}: {n}" for kind, n in sorted(result.reasons().items()))
        lines.append(f"rejected {len(result.rejected)} ({by_reason})")
        lines.extend(f"  {p.line()}" for p in result.rejected[:20])
        if len(result.rejected) > 20:
            lines.append(f"  ... {len(result.rejected) - 20} more in {REJECTED_NAME}")
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)


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
