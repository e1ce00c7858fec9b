"""Read an official FeTS2022 partitioning CSV (``Partition_ID,Subject_ID``) into partitions of subjects.

A CSV whose header is wrong or that lists no subject is unusable (``PartitionCsvError``). A bad row
(a duplicate subject, a non-integer partition id, a missing column) is a problem of that row only: it is
reported and left out, and the rest of the file is used.
"""

from __future__ import annotations

import csv
from collections import OrderedDict
from dataclasses import dataclass, field

from fedseg.data_prep.layout import PARTITION_HEADER


class PartitionCsvError(ValueError):
    """The partitioning CSV cannot be used at all (unreadable, wrong header, no subjects)."""


@dataclass
class RowProblem:
    line: int
    subject: str
    reason: str


@dataclass
class PartitionTable:
    path: str
    partitions: OrderedDict[int, list[str]]
    problems: list[RowProblem] = field(default_factory=list)

    def partition_of(self) -> dict[str, int]:
        return {sid: p for p, sids in self.partitions.items() for sid in sids}


def parse_partitions(path: str) -> PartitionTable:
    """Partition id -> subject ids in file order, plus the rows that had to be left out and why."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise PartitionCsvError(f"{path}: cannot read the partitioning CSV ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise PartitionCsvError(f"{path}: not a text CSV file ({exc.reason})") from exc
    if not rows or tuple(c.strip() for c in rows[0]) != PARTITION_HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise PartitionCsvError(f"{path}: header must be exactly {','.join(PARTITION_HEADER)}, found {found}")
    table = PartitionTable(path, OrderedDict())
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        subject = row[1].strip() if len(row) > 1 else ""
        if len(row) != 2:
            table.problems.append(RowProblem(line, subject, f"{path}:{line}: expected 2 columns, found {len(row)}"))
            continue
        raw_id = row[0].strip()
        try:
            partition = int(raw_id)
        except ValueError:
            table.problems.append(
                RowProblem(line, subject, f"{path}:{line}: Partition_ID {raw_id!r} is not an integer")
            )
            continue
        if not subject:
            table.problems.append(RowProblem(line, subject, f"{path}:{line}: empty Subject_ID"))
            continue
        if subject in seen:
            table.problems.append(
                RowProblem(
                    line,
                    subject,
                    f"{path}:{line}: subject {subject} listed twice (first in partition {seen[subject]}); "
                    "the first listing is kept",
                )
            )
            continue
        seen[subject] = partition
        table.partitions.setdefault(partition, []).append(subject)
    if not table.partitions:
        raise PartitionCsvError(f"{path}: no subjects listed")
    return table


def read_partitions(path: str) -> OrderedDict[int, list[str]]:
    """Strict reading: any bad row is an error naming the file, row and reason."""
    table = parse_partitions(path)
    if table.problems:
        raise PartitionCsvError(table.problems[0].reason)
    return table.partitions
