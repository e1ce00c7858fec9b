"""Partitioning CSVs and the per-site folders with their seeded training/validation split."""

from __future__ import annotations

import json
import os

import pytest

from fedseg.data import load_site_datalist
from fedseg.data_prep.fets2022 import prepare_sites, split_subjects
from fedseg.data_prep.partitions import PartitionCsvError, read_partitions


def test_official_csvs(official_csv):
    one = read_partitions(official_csv("partitioning_1.csv"))
    two = read_partitions(official_csv("partitioning_2.csv"))
    assert len(one) == 23 and len(two) == 33
    assert sum(map(len, one.values())) == sum(map(len, two.values())) == 1251
    assert sorted(len(s) for s in one.values())[-4:] == [35, 47, 382, 511]
    assert set().union(*one.values()) == set().union(*two.values())


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Partition,Subject\n1,FeTS2022_00001\n", "header must be exactly Partition_ID,Subject_ID"),
        ("Partition_ID,Subject_ID\n1,FeTS2022_00001\n2,FeTS2022_00001\n", "listed twice"),
        ("Partition_ID,Subject_ID\n1,FeTS2022_00002\nx,FeTS2022_00001\n", "is not an integer"),
        ("Partition_ID,Subject_ID\n1,FeTS2022_00002\n1,FeTS2022_00001,extra\n", "expected 2 columns"),
        ("Partition_ID,Subject_ID\n", "no subjects"),
        ("", "header must be exactly"),
    ],
)
def test_bad_csv_names_file_and_reason(tmp_path, text, reason):
    path = tmp_path / "partitioning.csv"
    path.write_text(text)
    with pytest.raises(PartitionCsvError, match=reason) as info:
        read_partitions(str(path))
    assert str(path) in str(info.value)


def test_split_is_seeded_disjoint_and_keeps_both_sides():
    subjects = [f"S{i:02d}" for i in range(20)]
    train, val = split_subjects(subjects, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16 and not set(train) & set(val)
    assert set(train) | set(val) == set(subjects)
    assert split_subjects(list(reversed(subjects)), 0.2, seed=3) == (train, val)  # order of input irrelevant
    assert split_subjects(subjects, 0.2, seed=4) != (train, val)
    assert split_subjects(["A", "B"], 0.1, seed=0)[1] != []  # at least one validation case
    assert split_subjects(["A", "B"], 0.9, seed=0)[0] != []  # at least one training case
    with pytest.raises(ValueError, match="validation fraction"):
        split_subjects(subjects, 1.0, seed=0)


def test_prepare_sites_writes_datalists_monai_can_read(tmp_path, tiny_fets):
    out = tmp_path / "sites"
    results = prepare_sites(tiny_fets, str(out), validation_fraction=0.34, seed=0)
    assert [(r.site, r.partition, r.training, r.validation) for r in results] == [
        ("site-1", 1, 3, 1),
        ("site-2", 2, 2, 1),
        ("site-3", 3, 2, 1),
    ]
    with open(out / "site-1" / "datalist.json") as f:
        datalist = json.load(f)
    assert datalist["modalities"] == ["t1", "t1ce", "t2", "flair"]
    training, validation = load_site_datalist(str(out / "site-1"))
    for item in training + validation:
        assert len(item["image"]) == 4 and all(os.path.isfile(p) for p in item["image"] + [item["label"]])
        assert item["image"][1].endswith("_t1ce.nii.gz") and item["label"].endswith("_seg.nii.gz")
    assert not {i["label"] for i in training} & {i["label"] for i in validation}


def test_prepare_reports_missing_subjects_and_unknown_partitions(tmp_path, tiny_fets):
    csv_path = tmp_path / "partitioning.csv"
    csv_path.write_text("Partition_ID,Subject_ID\n7,FeTS2022_00001\n7,FeTS2022_00002\n7,FeTS2022_09999\n")
    results = prepare_sites(
        tiny_fets, str(tmp_path / "sites"), csv_path=str(csv_path), name_template="inst-{partition}"
    )
    assert results[0].site == "inst-7" and results[0].missing == ["FeTS2022_09999"]
    assert results[0].training + results[0].validation == 2
    with pytest.raises(ValueError, match=r"partitions \[8\] are not in"):
        prepare_sites(tiny_fets, str(tmp_path / "x"), csv_path=str(csv_path), partitions=[8])
