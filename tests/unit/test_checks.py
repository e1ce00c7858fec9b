"""What is checked before anything is prepared: one subject's five files, and the partitioning CSV's rows.

Small real NIfTI files with one defect each, so that every reason a user can read in rejected.csv is
produced here in milliseconds (the end-to-end preparation tests cover the same defects through `prepare`).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.fets_factory import save, sri24_affine, volumes, write_subject

from fedseg.data_prep.checks import Problem, SubjectCheck, _short, check_subject, signature
from fedseg.data_prep.layout import MODALITIES, subject_file
from fedseg.data_prep.partitions import PartitionCsvError, parse_partitions, read_partitions

SID = "FeTS2022_00001"
SHAPE = (8, 8, 6)
T1 = f"{SID}_t1.nii.gz"


def subject(tmp_path, **changes) -> str:
    """A valid subject (the nested-tumour box of fets_factory) with ``changes``: kind -> array to save instead."""
    root = str(tmp_path)
    data = volumes(SHAPE, np.random.default_rng(0))
    write_subject(root, SID, SHAPE, data=data)
    for kind, array in changes.items():
        save(subject_file(root, SID, kind), array, sri24_affine(SHAPE))
    return root


def problems(root: str) -> list[Problem]:
    """The subject's problems, each naming the subject (rejected.csv is read by subject)."""
    result = check_subject(root, SID)
    assert result.subject == SID and all(p.subject == SID for p in result.problems), result.problems
    return result.problems


def only_problem(root: str) -> Problem:
    result = check_subject(root, SID)
    assert result.subject == SID and [p.subject for p in result.problems] == [SID], result.problems
    assert result.brain_box is None  # a subject with a problem is not cropped
    return result.problems[0]


def test_a_valid_subject_passes_with_its_geometry_dtypes_and_brain_box(tmp_path):
    root = subject(tmp_path)
    result = check_subject(root, SID)
    assert result.ok and result.problems == [] and result.subject == SID
    assert result.shape == list(SHAPE)
    np.testing.assert_array_equal(result.affine, sri24_affine(SHAPE))
    assert result.dtypes == {"t1": "int16", "t1ce": "int16", "t2": "int16", "flair": "int16", "seg": "uint8"}
    assert result.brain_box == [[1, 7], [1, 7], [1, 5]]  # the factory's brain: n // 6 .. n - n // 6
    assert result.signature == signature(root, SID)


def test_brain_box_is_the_exact_bounds_of_the_union_of_the_modalities(tmp_path):
    # the box that preprocess crops to: one voxel short on any side would cut brain away
    data = volumes(SHAPE, np.random.default_rng(0))
    t1, t2 = data["t1"].copy(), data["t2"].copy()
    t1[0, 3, 3] = 9  # the first image reaches the first voxel along x
    t2[7, 7, 5] = 9  # a middle one the last voxel along every axis
    root = subject(tmp_path, t1=t1, t2=t2)
    union = np.any([t1 != 0, data["t1ce"] != 0, t2 != 0, data["flair"] != 0], axis=0)
    expected = [[int(i.min()), int(i.max()) + 1] for i in np.nonzero(union)]
    assert check_subject(root, SID).brain_box == expected == [[0, 8], [1, 8], [1, 6]]


def test_the_seg_does_not_widen_the_brain_box(tmp_path):
    seg = volumes(SHAPE, np.random.default_rng(0))["seg"]
    seg[0, 0, 0] = 2  # a label outside the brain: the box is the images' (the seg is cropped with them)
    assert check_subject(subject(tmp_path, seg=seg), SID).brain_box == [[1, 7], [1, 7], [1, 5]]


@pytest.mark.parametrize("shift_mm, accepted", [(0.01, False), (0.5, False), (2.0, False), (2e-4, True)])
def test_affine_tolerance_is_a_thousandth_of_a_mm(tmp_path, shift_mm, accepted):
    root = subject(tmp_path)
    shifted = sri24_affine(SHAPE)
    shifted[0, 3] += shift_mm
    save(subject_file(root, SID, "t2"), volumes(SHAPE, np.random.default_rng(0))["t2"], shifted)
    if accepted:
        assert check_subject(root, SID).ok
    else:
        (problem,) = problems(root)
        assert (problem.file, problem.kind) == (f"{SID}_t2.nii.gz", "geometry")
        assert problem.reason == f"affine differs from {T1} by up to {shift_mm:.4g} mm"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_voxels_are_rejected(tmp_path, bad):
    t1ce = volumes(SHAPE, np.random.default_rng(0), image_dtype=np.float32)["t1ce"]
    t1ce[2, 2, 2] = t1ce[3, 3, 3] = bad
    problem = only_problem(subject(tmp_path, t1ce=t1ce))
    assert (problem.file, problem.kind, problem.reason) == (
        f"{SID}_t1ce.nii.gz",
        "non-finite",
        "2 non-finite voxels (NaN or Inf)",
    )


def test_finite_float_images_pass(tmp_path):
    t1 = volumes(SHAPE, np.random.default_rng(0), image_dtype=np.float64)["t1"] + 0.25
    t1[t1 == 0.25] = 0
    assert check_subject(subject(tmp_path, t1=t1), SID).ok


def test_missing_subject_folder(tmp_path):
    result = check_subject(str(tmp_path), SID)
    assert [(p.file, p.kind, p.reason) for p in problems(str(tmp_path))] == [
        ("", "missing", f"no subject folder {SID} in {tmp_path}")
    ]
    assert result.signature == [[f"{SID}_{k}.nii.gz", None, None] for k in (*MODALITIES, "seg")]


def test_missing_and_unreadable_files_are_each_named(tmp_path):
    root = subject(tmp_path)
    os.remove(subject_file(root, SID, "flair"))
    with open(subject_file(root, SID, "t1"), "wb") as f:
        f.write(b"not a NIfTI file")
    found = problems(root)
    assert [(p.file, p.kind) for p in found] == [(T1, "unreadable"), (f"{SID}_flair.nii.gz", "missing")]
    assert found[0].reason.startswith("unreadable (ImageFileError: ") and found[0].reason.endswith(")")
    assert found[1].reason == "file missing"
    assert found[0].line() == f"{SID}: {T1}: {found[0].reason}"


def test_a_truncated_file_is_unreadable(tmp_path):
    root = subject(tmp_path)
    path = subject_file(root, SID, "seg")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    assert only_problem(root).kind == "unreadable"


@pytest.mark.parametrize(
    "kind, array, reason",
    [
        ("t2", np.ones((8, 8, 5), np.int16), f"shape (8, 8, 5) differs from {T1} (8, 8, 6)"),
        ("t2", np.ones((8, 8, 6, 2), np.int16), "expected a 3D volume, found shape (8, 8, 6, 2)"),
        ("t1", np.ones((8, 8), np.int16), "expected a 3D volume, found shape (8, 8)"),
    ],
)
def test_geometry_problems(tmp_path, kind, array, reason):
    problem = only_problem(subject(tmp_path, **{kind: array}))
    assert (problem.file, problem.kind, problem.reason) == (f"{SID}_{kind}.nii.gz", "geometry", reason)


def test_the_first_readable_file_is_the_geometry_reference(tmp_path):
    root = subject(tmp_path, t2=np.ones((8, 8, 5), np.int16))
    os.remove(subject_file(root, SID, "t1"))  # t1ce becomes the reference of shape and affine
    found = problems(root)
    assert [p.kind for p in found] == ["missing", "geometry"]
    assert found[1].reason == f"shape (8, 8, 5) differs from {SID}_t1ce.nii.gz (8, 8, 6)"


@pytest.mark.parametrize(
    "values, reason",
    [
        ([3], "labels 3 not in {0, 1, 2, 4}"),
        ([0.5], "labels 0.5 not in {0, 1, 2, 4}"),
        ([3, 5, 6, 7, 8, 9], "labels 3, 5, 6, 7, 8, 9 not in {0, 1, 2, 4}"),
        ([3, 5, 6, 7, 8, 9, 10], "labels 3, 5, 6, 7, 8, 9 ... not in {0, 1, 2, 4}"),
    ],
)
def test_labels_outside_fets_are_listed(tmp_path, values, reason):
    seg = volumes(SHAPE, np.random.default_rng(0), seg_dtype=np.float32)["seg"]
    for i, value in enumerate(values):
        seg[i, 0, 0] = value
    problem = only_problem(subject(tmp_path, seg=seg))
    assert (problem.file, problem.kind, problem.reason) == (f"{SID}_seg.nii.gz", "labels", reason)


def test_an_empty_modality_has_no_brain(tmp_path):
    problem = only_problem(subject(tmp_path, t1ce=np.zeros(SHAPE, np.int16)))
    assert (problem.file, problem.kind, problem.reason) == (
        f"{SID}_t1ce.nii.gz",
        "empty",
        "image is empty (every voxel is 0): no brain",
    )


def test_an_empty_seg_is_valid(tmp_path):
    assert check_subject(subject(tmp_path, seg=np.zeros(SHAPE, np.uint8)), SID).ok  # a case without tumour


def test_every_problem_of_a_subject_is_reported(tmp_path):
    seg = volumes(SHAPE, np.random.default_rng(0))["seg"]
    seg[0, 0, 0] = 3
    root = subject(tmp_path, t2=np.zeros(SHAPE, np.int16), seg=seg)
    os.remove(subject_file(root, SID, "flair"))
    assert [p.kind for p in problems(root)] == ["empty", "missing", "labels"]


def shifted_t2(root: str) -> None:
    affine = sri24_affine(SHAPE)
    affine[2, 3] += 0.5
    save(subject_file(root, SID, "t2"), volumes(SHAPE, np.random.default_rng(0))["t2"], affine)


def nan_t2(root: str) -> None:
    t2 = volumes(SHAPE, np.random.default_rng(0), image_dtype=np.float32)["t2"]
    t2[1, 1, 1] = np.nan
    save(subject_file(root, SID, "t2"), t2, sri24_affine(SHAPE))


@pytest.mark.parametrize(
    "defect, kind",
    [
        (
            lambda root: save(subject_file(root, SID, "t2"), np.ones((8, 8, 5), np.int16), sri24_affine(SHAPE)),
            "geometry",
        ),
        (
            lambda root: save(subject_file(root, SID, "t2"), np.ones((8, 8, 6, 2), np.int16), sri24_affine(SHAPE)),
            "geometry",
        ),
        (shifted_t2, "geometry"),
        (nan_t2, "non-finite"),
    ],
)
def test_a_bad_file_does_not_stop_the_checks_of_the_files_after_it(tmp_path, defect, kind):
    seg = volumes(SHAPE, np.random.default_rng(0))["seg"]
    seg[0, 0, 0] = 3
    root = subject(tmp_path, seg=seg)
    defect(root)
    assert [(p.file, p.kind) for p in problems(root)] == [(f"{SID}_t2.nii.gz", kind), (f"{SID}_seg.nii.gz", "labels")]


def test_a_problem_without_a_file_reads_with_a_dash():
    assert Problem(SID, "", "absent", "listed but not on disk").line() == f"{SID}: -: listed but not on disk"


def test_a_cached_check_without_problems_reads_back_as_valid():
    check = SubjectCheck.from_json({"subject": SID, "signature": [], "shape": [8, 8, 6]})
    assert check.ok and check.problems == [] and check.shape == [8, 8, 6]


@pytest.mark.parametrize(
    "exc, text",
    [
        (ValueError(""), "ValueError"),
        (OSError("  not a gzip file\nmore detail"), "OSError: not a gzip file"),
        (EOFError("x" * 300), "EOFError: " + "x" * 190),
    ],
)
def test_a_read_error_is_one_short_line_for_rejected_csv(exc, text):
    assert _short(exc) == text


def test_a_check_survives_its_json_round_trip(tmp_path):
    root = subject(tmp_path, t1ce=np.zeros(SHAPE, np.int16))
    result = check_subject(root, SID)
    again = SubjectCheck.from_json(result.to_json())
    assert again == result and not again.ok and isinstance(again.problems[0], Problem)


def test_signature_changes_with_the_file(tmp_path):
    root = subject(tmp_path)
    before = signature(root, SID)
    assert [row[0] for row in before] == [f"{SID}_{k}.nii.gz" for k in (*MODALITIES, "seg")]
    assert all(size > 0 and mtime > 0 for _, size, mtime in before)
    write_subject(root, SID, (8, 8, 7), seed=1)
    assert signature(root, SID) != before


# -- the partitioning CSV, read leniently: a bad row is left out and said, the rest is used ---------------


def csv_file(tmp_path, text: str, encoding: str = "utf-8") -> str:
    path = tmp_path / "partitioning.csv"
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_bad_rows_are_left_out_with_their_line_and_reason(tmp_path):
    path = csv_file(tmp_path, "Partition_ID,Subject_ID\n2,S1\n\n1, S2 \nx,S3\n1,S4,extra\n1,\n3,S1\n , \n2,S5\n")
    table = parse_partitions(path)
    assert table.path == path
    assert list(table.partitions.items()) == [(2, ["S1", "S5"]), (1, ["S2"])]  # file order, stripped
    assert table.partition_of() == {"S1": 2, "S5": 2, "S2": 1}
    assert [(p.line, p.subject, p.reason) for p in table.problems] == [
        (5, "S3", f"{path}:5: Partition_ID 'x' is not an integer"),
        (6, "S4", f"{path}:6: expected 2 columns, found 3"),
        (7, "", f"{path}:7: empty Subject_ID"),
        (8, "S1", f"{path}:8: subject S1 listed twice (first in partition 2); the first listing is kept"),
    ]
    with pytest.raises(PartitionCsvError, match=f"^{path}:5: Partition_ID 'x' is not an integer$"):
        read_partitions(path)


def test_a_header_with_spaces_and_a_byte_order_mark_is_accepted(tmp_path):
    path = csv_file(tmp_path, "\ufeffPartition_ID , Subject_ID\r\n1,S1\r\n", encoding="utf-8")
    assert read_partitions(path) == {1: ["S1"]}


def test_a_single_column_row_is_a_row_problem(tmp_path):
    table = parse_partitions(csv_file(tmp_path, "Partition_ID,Subject_ID\n1,S1\n7\n"))
    assert [(p.line, p.subject, p.reason.split(": ", 1)[1]) for p in table.problems] == [
        (3, "", "expected 2 columns, found 1")
    ]


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "cannot read the partitioning CSV (No such file or directory)"),
        (b"\xff\xfe\x00P\x00a", "not a text CSV file (invalid start byte)"),
        (b"", "header must be exactly Partition_ID,Subject_ID, found an empty file"),
        (b"Partition_ID,Subject\n1,S1\n", "header must be exactly Partition_ID,Subject_ID, found Partition_ID,Subject"),
        (b"Partition_ID,Subject_ID\nx,S1\n", "no subjects listed"),
    ],
)
def test_an_unusable_csv_is_refused_whole(tmp_path, content, reason):
    path = tmp_path / "partitioning.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PartitionCsvError) as info:
        parse_partitions(str(path))
    assert str(info.value) == f"{path}: {reason}"
