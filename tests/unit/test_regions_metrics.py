"""Label <-> region mapping and the Dice/HD95 scores on masks whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import ConvertToMultiChannelBasedOnBratsClassesd

from fedseg.metrics import MISSED_HD95_MM, RegionMetrics, case_scores
from fedseg.regions import REGIONS, invalid_labels, labels_to_regions, regions_to_labels


def test_regions_order_and_membership():
    seg = np.array([0, 1, 2, 4], dtype=np.uint8).reshape(4, 1, 1)
    tc, wt, et = labels_to_regions(seg)[:, :, 0, 0]
    assert REGIONS == ("TC", "WT", "ET")
    assert tc.tolist() == [False, True, False, True]
    assert wt.tolist() == [False, True, True, True]
    assert et.tolist() == [False, False, False, True]


def test_regions_agree_with_monai_transform_used_in_training():
    rng = np.random.default_rng(0)
    seg = rng.choice([0, 1, 2, 4], size=(6, 5, 4)).astype(np.uint8)
    monai = ConvertToMultiChannelBasedOnBratsClassesd(keys="label")({"label": seg[None]})["label"]
    np.testing.assert_array_equal(np.asarray(monai).astype(bool), labels_to_regions(seg))


def test_round_trip_of_nested_labels():
    rng = np.random.default_rng(1)
    seg = rng.choice([0, 1, 2, 4], size=(8, 8, 8)).astype(np.uint8)
    np.testing.assert_array_equal(regions_to_labels(labels_to_regions(seg)), seg)


def test_non_nested_prediction_is_resolved_inside_whole_tumour():
    regions = np.zeros((3, 3, 1, 1), dtype=bool)
    regions[2, 0] = True  # ET alone, outside WT: dropped
    regions[1, 1] = regions[2, 1] = True  # WT + ET without TC: oedema
    regions[:, 2] = True  # all three: enhancing
    assert regions_to_labels(regions)[:, 0, 0].tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match=r"\(3, X, Y, Z\)"):
        regions_to_labels(np.zeros((2, 3, 3, 3)))


def test_tumour_core_outside_whole_tumour_is_not_turned_into_a_label():
    """The `wt &` guard: TC (with or without ET) predicted where WT is not stays background."""
    regions = np.zeros((3, 4, 1, 1), dtype=bool)
    regions[0, 0] = True  # TC alone
    regions[0, 1] = regions[2, 1] = True  # TC + ET without WT
    regions[0, 2] = regions[1, 2] = True  # TC inside WT: necrotic core
    regions[1, 3] = True  # WT alone: oedema
    assert regions_to_labels(regions)[:, 0, 0].tolist() == [0, 0, 1, 2]
    assert regions_to_labels(regions).dtype == np.uint8


def test_invalid_labels_are_listed():
    assert invalid_labels(np.array([0, 1, 2, 4])) == []
    assert invalid_labels(np.array([0, 3, 4, 5.5])) == [3.0, 5.5]


def cube(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def stack(*masks) -> torch.Tensor:
    return torch.from_numpy(np.stack(masks)).float()


def test_dice_known_answers():
    shape = (20, 20, 20)
    truth = cube(shape, (2, 2, 2), 10)  # 1000 voxels
    half = cube(shape, (2, 2, 2), 10)
    half[7:] = False  # first 5 slices: 500 voxels, all inside truth
    empty = np.zeros(shape, dtype=bool)
    scores = case_scores(stack(truth, half, empty), stack(truth, truth, empty))
    assert scores["dice_tc"] == pytest.approx(1.0)
    assert scores["dice_wt"] == pytest.approx(2 * 500 / 1500)
    assert scores["dice_et"] == 1.0  # empty in both: BraTS convention
    assert scores["hd95_et"] == 0.0
    assert scores["dice_mean"] == pytest.approx((1 + 2 / 3 + 1) / 3)


def test_hd95_known_answers_with_spacing():
    shape = (30, 20, 20)
    truth = cube(shape, (5, 5, 5), 6)
    shifted = cube(shape, (8, 5, 5), 6)  # 3 voxels along x
    empty = np.zeros(shape, dtype=bool)
    scores = case_scores(stack(truth, shifted, empty), stack(truth, truth, truth), spacing=(2.0, 1.0, 1.0))
    assert scores["hd95_tc"] == pytest.approx(0.0)
    assert scores["hd95_wt"] == pytest.approx(6.0)  # 3 voxels x 2 mm
    # missed region: Dice 0 and BraTS's fixed 373.13 mm, not this volume's diagonal (a measure of the head)
    assert scores["hd95_et"] == MISSED_HD95_MM == 373.13
    assert scores["dice_et"] == 0.0
    other_grid = case_scores(stack(truth, shifted, empty), stack(truth, truth, truth), spacing=(1.0, 3.0, 3.0))
    assert other_grid["hd95_et"] == MISSED_HD95_MM  # the same whatever the case's size and spacing
    false_alarm = case_scores(stack(truth, truth, truth), stack(truth, truth, empty))
    assert false_alarm["hd95_et"] == MISSED_HD95_MM and false_alarm["dice_et"] == 0.0


def two_cases() -> RegionMetrics:
    """A perfect case and one whose TC and ET are missed (Dice 0 there, 1 elsewhere)."""
    shape = (10, 10, 10)
    full, empty = cube(shape, (0, 0, 0), 10), np.zeros(shape, dtype=bool)
    metrics = RegionMetrics()
    metrics.add(stack(full, full, full), stack(full, full, full))
    metrics.add(stack(empty, full, empty), stack(full, full, full))
    return metrics


def test_region_metrics_summary_means_over_cases():
    metrics = two_cases()
    summary = metrics.summary()
    assert summary["n_cases"] == 2
    assert summary["dice_wt"] == pytest.approx(1.0)
    assert summary["dice_tc"] == pytest.approx(0.5)
    assert np.isnan(RegionMetrics().summary()["dice_mean"])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must both be"):
        case_scores(torch.zeros(3, 4, 4, 4), torch.zeros(3, 4, 4, 5))


def test_hd95_default_spacing_is_one_mm():
    shape = (30, 20, 20)
    truth, shifted = cube(shape, (5, 5, 5), 6), cube(shape, (8, 5, 5), 6)
    scores = case_scores(stack(truth, shifted, truth), stack(truth, truth, truth))
    assert scores["hd95_wt"] == pytest.approx(3.0)
    assert scores["hd95_tc"] == scores["hd95_et"] == 0.0


def test_hd95_is_the_95th_percentile_not_the_maximum():
    # truth: a line of 20 voxels along x; prediction: the diagonal (i, i). Each predicted voxel lies i voxels
    # from the truth, so the distances are 0..19: the 95th percentile is 18.05, the maximum 19
    shape = (20, 20, 1)
    truth, diagonal = np.zeros(shape, bool), np.zeros(shape, bool)
    truth[:, 0, 0] = True
    diagonal[np.arange(20), np.arange(20), 0] = True
    scores = case_scores(stack(truth, diagonal, truth), stack(truth, truth, truth))
    assert scores["hd95_wt"] == pytest.approx(np.percentile(np.arange(20), 95))


def test_region_metrics_use_the_case_spacing_and_give_population_sd():
    shape = (30, 20, 20)
    truth, shifted = cube(shape, (5, 5, 5), 6), cube(shape, (8, 5, 5), 6)
    metrics = RegionMetrics()
    metrics.add(stack(truth, shifted, truth), stack(truth, truth, truth), spacing=(2.0, 1.0, 1.0))
    metrics.add(stack(truth, truth, truth), stack(truth, truth, truth), spacing=(2.0, 1.0, 1.0))
    summary = metrics.summary()
    assert summary["hd95_wt"] == pytest.approx(3.0)  # (6 mm + 0 mm) / 2
    assert summary["hd95_wt_sd"] == pytest.approx(3.0)  # population sd of {6, 0}
    assert summary["dice_wt_sd"] == pytest.approx(np.std([0.5, 1.0]))  # 3 of 6 slices overlap: Dice 0.5
    assert summary["dice_tc_sd"] == 0.0
    assert np.isnan(RegionMetrics().summary()["dice_mean_sd"])


def test_no_spread_leaves_a_site_below_its_minimum_of_cases():
    metrics = two_cases()
    below = metrics.summary(min_cases=3)  # mean and sd of two cases would give both cases' scores
    assert below["n_cases"] == 2 and below["dice_tc"] == pytest.approx(0.5)
    assert not [key for key in below if key.endswith("_sd")]
    at = metrics.summary(min_cases=2)
    assert at["dice_tc_sd"] == pytest.approx(0.5) and set(at) == set(metrics.summary())
