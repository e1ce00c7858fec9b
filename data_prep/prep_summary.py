"""What a preparation run reports: ``rejected.csv`` (subject, file, reason), ``prep_summary.json`` and the
printed summary, from its ``PrepResult``."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import dataclass

from fedseg.atomic import write_json, write_text
from fedseg.data_prep.checks import Problem
from fedseg.data_prep.site_folder import SiteResult

REJECTED_NAME = "rejected.csv"
SUMMARY_NAME = "prep_summary.json"


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
