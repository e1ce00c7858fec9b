"""FeTS2022 preparation: official partitions, every kind of bad input, modes, incremental and killed runs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers.fets_factory import (
    FETS_SHAPE,
    build_from_csv,
    read_csv,
    save,
    sri24_affine,
    tree_digest,
    volumes,
    write_csv,
    write_subject,
)

from fedseg.data_prep.cli import main as data_prep_main
from fedseg.data_prep.fets2022 import PrepError, prepare
from fedseg.data_prep.layout import subject_file
from fedseg.data_prep.materialise import uncrop


def rejected_rows(out: str) -> list[dict]:
    with open(os.path.join(out, "rejected.csv"), newline="") as f:
        return list(csv.DictReader(f))


def datalist(out: str, site: str) -> dict:
    with open(os.path.join(out, site, "datalist.json")) as f:
        return json.load(f)


# -- the official partitionings --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fets_official") / "MICCAI_FeTS2022_TrainingData")
    rows = build_from_csv(
        root, os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "fets2022", "partitioning_1.csv")
    )
    return root, rows


def test_all_partitions_of_both_official_csvs(official_tree, official_csv, tmp_path):
    root, _ = official_tree
    out = str(tmp_path / "sites")
    before = tree_digest(root)
    for name, count in (("partitioning_1.csv", 23), ("partitioning_2.csv", 33)):
        expected: dict[int, int] = {}
        for partition, _ in read_csv(official_csv(name)):
            expected[partition] = expected.get(partition, 0) + 1
        result = prepare(root, out, csv_path=official_csv(name), show_progress=False)
        assert len(result.sites) == count
        for site in result.sites:
            assert site.training + site.validation == expected[site.partition], site
            listed = datalist(out, site.site)
            assert len(listed["training"]) == site.training and len(listed["validation"]) == site.validation
        assert result.rejected == []
        if name == "partitioning_2.csv":
            assert result.read == 0  # same subjects as the first run: nothing read again
    assert [s.site for s in result.sites][:2] == ["site-1", "site-2"]
    assert tree_digest(root) == before


def test_largest_partitions_and_name_template(official_tree, tmp_path):
    root, _ = official_tree
    result = prepare(root, str(tmp_path / "sites"), largest=3, name_template="inst-{partition}", show_progress=False)
    sizes = {s.site: s.training + s.validation for s in result.sites}
    assert sizes == {"inst-1": 511, "inst-4": 47, "inst-18": 382}
    assert [s.site for s in result.sites] == ["inst-1", "inst-4", "inst-18"]  # chosen by size, named in id order
    assert all(os.path.isdir(tmp_path / "sites" / s) for s in sizes)


# -- every kind of bad input -----------------------------------------------------------------------------

GOOD = [f"FeTS2022_{n:05d}" for n in range(1, 7)]
EXPECTED_KINDS = {
    "FeTS2022_00101": ("FeTS2022_00101_t1ce.nii.gz", "unreadable"),
    "FeTS2022_00102": ("FeTS2022_00102_flair.nii.gz", "missing"),
    "FeTS2022_00103": ("FeTS2022_00103_t2.nii.gz", "geometry"),
    "FeTS2022_00104": ("FeTS2022_00104_seg.nii.gz", "geometry"),
    "FeTS2022_00105": ("FeTS2022_00105_seg.nii.gz", "labels"),
    "FeTS2022_00106": ("FeTS2022_00106_t1.nii.gz", "non-finite"),
    "FeTS2022_00107": ("FeTS2022_00107_t2.nii.gz", "empty"),
    "FeTS2022_00108": ("FeTS2022_00108_seg.nii.gz", "labels"),
    "FeTS2022_00109": ("FeTS2022_00109_t1.nii.gz", "unreadable"),
    "FeTS2022_00110": ("", "absent"),
    "FeTS2022_00201": ("", "too-few"),
}


def build_bad_tree(root: str) -> None:
    shape = (8, 8, 6)
    affine = sri24_affine(shape)
    rng = np.random.default_rng(0)
    for i, sid in enumerate(GOOD):
        write_subject(root, sid, shape, seed=i)
    for sid in list(EXPECTED_KINDS)[:9] + ["FeTS2022_00199", "FeTS2022_00201"]:
        write_subject(root, sid, shape, seed=1)
    path = subject_file(root, "FeTS2022_00101", "t1ce")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    os.remove(subject_file(root, "FeTS2022_00102", "flair"))
    save(subject_file(root, "FeTS2022_00103", "t2"), np.ones((8, 8, 5), np.int16), affine)
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    save(subject_file(root, "FeTS2022_00104", "seg"), volumes(shape, rng)["seg"], shifted)
    seg = volumes(shape, rng)["seg"]
    seg[0, 0, 0] = 3
    save(subject_file(root, "FeTS2022_00105", "seg"), seg, affine)
    t1 = volumes(shape, rng, image_dtype=np.float32)["t1"]
    t1[3, 3, 3] = np.nan
    save(subject_file(root, "FeTS2022_00106", "t1"), t1, affine)
    save(subject_file(root, "FeTS2022_00107", "t2"), np.zeros(shape, np.int16), affine)
    seg = volumes(shape, rng, seg_dtype=np.float32)["seg"]
    seg[1, 1, 1] = 0.5
    save(subject_file(root, "FeTS2022_00108", "seg"), seg, affine)
    with open(subject_file(root, "FeTS2022_00109", "t1"), "wb") as f:
        f.write(b"this is not a NIfTI file")
    rows = [(1, s) for s in GOOD + list(EXPECTED_KINDS)[:10]] + [(2, "FeTS2022_00001"), (2, "FeTS2022_00201")]
    write_csv(os.path.join(root, "partitioning_1.csv"), rows)


@pytest.fixture
def bad_tree(tmp_path):
    root = str(tmp_path / "MICCAI_FeTS2022_TrainingData")
    build_bad_tree(root)
    return root


def test_every_bad_input_gets_its_reason_and_the_rest_is_prepared(bad_tree, tmp_path):
    out = str(tmp_path / "sites")
    before = tree_digest(bad_tree)
    result = prepare(bad_tree, out, show_progress=False, workers=2)
    assert [s.site for s in result.sites] == ["site-1"]
    listed = datalist(out, "site-1")
    assert sorted(i["subject"] for i in listed["training"] + listed["validation"]) == GOOD
    rows = rejected_rows(out)
    by_subject = {}
    for row in rows:
        by_subject.setdefault(row["subject"], []).append(row)
    for sid, (file, kind) in EXPECTED_KINDS.items():
        assert sid in by_subject, sid
        assert (by_subject[sid][0]["file"], by_subject[sid][0]["kind"]) == (file, kind), by_subject[sid]
    duplicate = [r for r in rows if r["kind"] == "csv"]
    assert len(duplicate) == 1 and "FeTS2022_00001 listed twice" in duplicate[0]["reason"]
    reasons = {r["subject"]: r["reason"] for r in rows}
    assert "affine differs" in reasons["FeTS2022_00104"] and "2 mm" in reasons["FeTS2022_00104"]
    assert reasons["FeTS2022_00105"] == "labels 3 not in {0, 1, 2, 4}"
    assert "0.5" in reasons["FeTS2022_00108"]
    assert "1 non-finite voxels" in reasons["FeTS2022_00106"]
    assert any("FeTS2022_00199" in w for w in result.warnings)  # on disk, in no partition: warned
    assert "FeTS2022_00199" not in by_subject
    assert tree_digest(bad_tree) == before


def test_strict_fails_and_changes_no_site(bad_tree, tmp_path, capsys):
    out = str(tmp_path / "sites")
    with pytest.raises(PrepError, match="--strict"):
        prepare(bad_tree, out, strict=True, show_progress=False)
    assert not os.path.exists(os.path.join(out, "site-1"))
    assert len(rejected_rows(out)) == len(EXPECTED_KINDS) + 1
    assert data_prep_main(["fets2022", bad_tree, "--out", out, "--strict", "--quiet"]) == 1
    assert data_prep_main(["fets2022", bad_tree, "--out", out, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "rejected 12" in printed and "unreadable: 2" in printed and "site-1" in printed


def test_unusable_csv_and_output_inside_source_fail(bad_tree, tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("Subject,Partition\n")
    assert data_prep_main(["fets2022", bad_tree, "--out", str(tmp_path / "o"), "--csv", str(bad_csv), "--quiet"]) == 1
    with pytest.raises(PrepError, match="inside the source folder"):
        prepare(bad_tree, os.path.join(bad_tree, "sites"), show_progress=False)
    assert not os.path.exists(os.path.join(bad_tree, "sites"))


def test_fixed_subject_is_picked_up_and_nothing_else_reread(bad_tree, tmp_path):
    out = str(tmp_path / "sites")
    prepare(bad_tree, out, show_progress=False)
    again = prepare(bad_tree, out, show_progress=False)
    assert (again.read, again.written) == (0, 0)
    write_subject(bad_tree, "FeTS2022_00105", (8, 8, 6), seed=5)  # fix the wrong label
    fixed = prepare(bad_tree, out, show_progress=False)
    assert (fixed.read, fixed.written) == (1, 1)
    listed = datalist(out, "site-1")
    assert "FeTS2022_00105" in [i["subject"] for i in listed["training"] + listed["validation"]]
    assert "FeTS2022_00105" not in {r["subject"] for r in rejected_rows(out)}


# -- modes -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size_tree(tmp_path_factory):
    """Four full-size subjects with the dtypes found in the wild."""
    root = str(tmp_path_factory.mktemp("fets_full") / "MICCAI_FeTS2022_TrainingData")
    kinds = [(np.int16, np.uint8), (np.float32, np.float32), (np.float64, np.uint8), (np.int16, np.float64)]
    sids = ["FeTS2022_01341", "FeTS2022_01333", "FeTS2022_01334", "FeTS2022_01335"]
    for i, (sid, (image_dtype, seg_dtype)) in enumerate(zip(sids, kinds)):
        write_subject(root, sid, FETS_SHAPE, seed=i, image_dtype=image_dtype, seg_dtype=seg_dtype)
    write_csv(os.path.join(root, "partitioning_1.csv"), [(1, s) for s in sids])
    return root, sids


@pytest.mark.parametrize("mode", ["link", "copy", "preprocess"])
def test_modes_write_what_they_promise(full_size_tree, tmp_path, mode):
    root, sids = full_size_tree
    before = tree_digest(root)
    out = str(tmp_path / mode)
    result = prepare(root, out, mode=mode, validation_fraction=0.25, show_progress=False)
    assert result.rejected == [] and result.sites[0].training == 3
    site = os.path.join(out, "site-1")
    with open(os.path.join(site, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["mode"] == mode and sorted(manifest["subjects"]) == sorted(sids)
    sid = "FeTS2022_01333"  # float32 images, float seg
    source_seg = nib.load(subject_file(root, sid, "seg"))
    prepared_seg = nib.load(subject_file(site, sid, "seg"))
    if mode == "link":
        assert os.path.islink(os.path.join(site, sid))
    if mode == "copy":
        assert not os.path.islink(os.path.join(site, sid))
        assert np.array_equal(np.asarray(prepared_seg.dataobj), np.asarray(source_seg.dataobj))
    if mode == "preprocess":
        crop = manifest["subjects"][sid]["crop"]
        assert crop["original_shape"] == list(FETS_SHAPE)
        assert prepared_seg.shape == tuple(b - a for a, b in crop["box"]) and prepared_seg.shape < FETS_SHAPE
        assert prepared_seg.get_data_dtype() == np.uint8
        assert nib.load(subject_file(site, sid, "t1")).get_data_dtype() == np.int16  # integral float32 -> int16
        # world coordinates kept: the first voxel of the crop sits where it sat in the source
        start = [a for a, _ in crop["box"]]
        np.testing.assert_allclose(prepared_seg.affine @ [0, 0, 0, 1], source_seg.affine @ [*start, 1])
        restored = uncrop(np.asarray(prepared_seg.dataobj), crop)
        np.testing.assert_array_equal(restored, np.asarray(source_seg.dataobj).astype(np.uint8))
        for kind in ("t1", "flair"):  # the images too: a brain box one voxel short would cut brain away
            restored = uncrop(np.asarray(nib.load(subject_file(site, sid, kind)).dataobj), crop)
            np.testing.assert_array_equal(restored, np.asarray(nib.load(subject_file(root, sid, kind)).dataobj))
    assert tree_digest(root) == before


@pytest.mark.parametrize("mode", ["link", "copy", "preprocess"])
def test_demo_trainer_trains_on_a_prepared_site(tiny_fets, tmp_path, mode):
    from fedseg.trainer import SiteTrainer, parse_args

    prepare(tiny_fets, str(tmp_path), partitions=[1], mode=mode, validation_fraction=0.25, show_progress=False)
    args = parse_args(
        [
            "--crop",
            "16",
            "16",
            "16",
            "--channels",
            "4",
            "8",
            "--batch_size",
            "2",
            "--cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    trainer = SiteTrainer(str(tmp_path / "site-1"), args)
    result = trainer.train(1)
    metrics = trainer.validate()
    assert result["num_steps"] == 2 and np.isfinite(result["train_loss"])
    assert metrics["n_cases"] == 1 and 0.0 <= metrics["dice_mean"] <= 1.0


# -- a killed run ------------------------------------------------------------------------------------------

# The preparation, killed by SIGKILL at a fixed point: just after its first save of the check cache, with
# subjects still unchecked (no timing involved: the process kills itself there).
KILLED_AFTER_FIRST_CACHE_SAVE = """
import os, signal, sys
from fedseg.data_prep.check_cache import CheckCache
from fedseg.data_prep.cli import main

save = CheckCache.save

def save_then_die(cache):
    save(cache)
    os.kill(os.getpid(), signal.SIGKILL)

CheckCache.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_and_ends_correct(official_tree, tmp_path):
    root, rows = official_tree
    out = str(tmp_path / "killed")
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_AFTER_FIRST_CACHE_SAVE,
            "fets2022",
            root,
            "--out",
            out,
            "--mode",
            "copy",
            "--workers",
            "1",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with open(os.path.join(out, ".prep_cache.json")) as f:
        checked = len(json.load(f)["entries"])
    assert 0 < checked < len(rows)  # killed midway through the checks
    assert not os.path.exists(os.path.join(out, "site-1", "datalist.json"))
    resumed = prepare(root, out, mode="copy", show_progress=False)
    assert resumed.reused == checked  # what the killed run had read was not read again
    clean = prepare(root, str(tmp_path / "clean"), mode="copy", show_progress=False)
    assert [vars(s) for s in resumed.sites] == [vars(s) for s in clean.sites]
    for site in clean.sites:
        assert datalist(out, site.site) == datalist(str(tmp_path / "clean"), site.site)
        names = sorted(os.listdir(os.path.join(out, site.site)))
        assert names == sorted(os.listdir(os.path.join(str(tmp_path / "clean"), site.site)))  # no leftovers
