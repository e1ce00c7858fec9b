"""Read an official FeTS2022 partitioning CSV (``Partition_ID,Subject_ID``) into partitions of subjects."""

from __future__ import annotations

import csv
from collections import OrderedDict

from data_prep.layout import PARTITION_HEADER


class PartitionCsvError(ValueError):
    """The partitioning CSV cannot be used (wrong header, bad ids, duplicates)."""


def read_partitions(path: str) -> "OrderedDict[int, list[str]]":
    """Partition id -> subject ids, in file order. Raises PartitionCsvError naming the file, row and reason."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise PartitionCsvError(f"{path}: cannot read the partitioning CSV ({exc.strerror})") from exc
    if not rows or tuple(c.strip() for c in rows[0]) != PARTITION_HEADER:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise PartitionCsvError(f"{path}: header must be exactly {','.join(PARTITION_HEADER)}, found {found}")
    partitions: OrderedDict[int, list[str]] = OrderedDict()
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise PartitionCsvError(f"{path}:{line}: expected 2 columns, found {len(row)}")
        raw_id, subject = row[0].strip(), row[1].strip()
        try:
            partition = int(raw_id)
        except ValueError:
            raise PartitionCsvError(f"{path}:{line}: Partition_ID {raw_id!r} is not an integer") from None
        if not subject:
            raise PartitionCsvError(f"{path}:{line}: empty Subject_ID")
        if subject in seen:
            raise PartitionCsvError(
                f"{path}:{line}: subject {subject} listed twice (first in partition {seen[subject]})"
            )
        seen[subject] = partition
        partitions.setdefault(partition, []).append(subject)
    if not partitions:
        raise PartitionCsvError(f"{path}: no subjects listed")
    return partitions
