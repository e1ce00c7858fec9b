"""The FeTS2022 training-data layout, written down once.

``MICCAI_FeTS2022_TrainingData/FeTS2022_XXXXX/FeTS2022_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`` plus the
partitioning CSVs (header exactly ``Partition_ID,Subject_ID``). The modality order is the network's input
order, taken from ``fedseg.regions`` (a numpy-only module: data_prep needs no torch).
"""

from __future__ import annotations

import os

from fedseg.regions import MODALITIES, SEG_SUFFIX

__all__ = ["MODALITIES", "SEG", "TRAINING_FOLDER", "PARTITION_HEADER", "subject_id", "subject_file"]

TRAINING_FOLDER = "MICCAI_FeTS2022_TrainingData"
SEG = SEG_SUFFIX
PARTITION_HEADER = ("Partition_ID", "Subject_ID")
SUBJECT_PREFIX = "FeTS2022_"


def subject_id(number: int) -> str:
    return f"{SUBJECT_PREFIX}{number:05d}"


def subject_file(root: str, sid: str, kind: str) -> str:
    """Path of one file of a subject: ``kind`` is a modality or ``seg``."""
    return os.path.join(root, sid, f"{sid}_{kind}.nii.gz")
