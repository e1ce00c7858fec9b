"""Checking the subjects of the chosen partitions (``fedseg.data_prep.checks``), reading again only those whose
files changed since the last run: the results are kept in ``.prep_cache.json`` beside the site folders, keyed by
subject and valid while the subject's file signature (sizes and mtimes) is unchanged. The cache is saved every
few subjects, so a run that is killed resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time

from fedseg.atomic import write_json
from fedseg.data_prep.checks import Problem, SubjectCheck, check_subject, signature
from fedseg.data_prep.parallel import run_parallel
from fedseg.data_prep.partitions import PartitionTable

CACHE_NAME = ".prep_cache.json"
CACHE_VERSION = 1


class CheckCache:
    """Check results keyed by subject, valid while the subject's file signature is unchanged."""

    def __init__(self, out_dir: str, data_dir: str) -> None:
        self.path = os.path.join(out_dir, CACHE_NAME)
        self.data_dir = data_dir
        self.entries: dict[str, dict] = {}
        if os.path.isfile(self.path):
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


def check_subjects(
    table: PartitionTable,
    chosen: list[int],
    on_disk: set[str],
    data_dir: str,
    out_dir: str,
    workers: int,
    show_progress: bool,
    rejected: list[Problem],
) -> tuple[dict[str, SubjectCheck], int, int]:
    """Check every subject of the chosen partitions, reusing checks of unchanged files; (checks, read, reused).

    A listed subject without a folder on disk is appended to ``rejected``.
    """
    cache = CheckCache(out_dir, data_dir)
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

    run_parallel(to_read, check_subject, workers, "checking subjects", show_progress, keep)
    cache.save()
    return checks, len(to_read), reused
