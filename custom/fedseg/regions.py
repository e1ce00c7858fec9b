"""FeTS2022 labels and the tumour regions the network predicts: the one place that knows them.

FeTS/BraTS segmentations use labels 0 background, 1 necrotic core, 2 oedema, 4 enhancing tumour
(there is no label 3). The network predicts three overlapping regions, one sigmoid channel each:
TC (tumour core) = {1, 4}, WT (whole tumour) = {1, 2, 4}, ET (enhancing tumour) = {4}.
"""

from __future__ import annotations

import numpy as np

# Order of the four MRI modalities in the network input (channel 0..3).
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
# File suffix of the segmentation in the FeTS layout.
SEG_SUFFIX = "seg"
# A prepared site folder's MONAI datalist: data_prep writes it, the site trainer reads it.
DATALIST_NAME = "datalist.json"
# Labels a FeTS segmentation may contain.
VALID_LABELS: frozenset[int] = frozenset({0, 1, 2, 4})
NECROTIC_CORE, OEDEMA, ENHANCING = 1, 2, 4
# Output channels of the network, in order.
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")
REGION_LABELS: dict[str, frozenset[int]] = {
    "TC": frozenset({NECROTIC_CORE, ENHANCING}),
    "WT": frozenset({NECROTIC_CORE, OEDEMA, ENHANCING}),
    "ET": frozenset({ENHANCING}),
}


def labels_to_regions(seg: np.ndarray) -> np.ndarray:
    """FeTS label map (X, Y, Z) -> boolean region masks (3, X, Y, Z) in REGIONS order."""
    seg = np.asarray(seg)
    return np.stack([np.isin(seg, sorted(REGION_LABELS[r])) for r in REGIONS], axis=0)


def regions_to_labels(regions: np.ndarray) -> np.ndarray:
    """Region masks (3, X, Y, Z) -> FeTS label map with labels {0, 1, 2, 4}.

    The masks need not be nested (a network may predict ET outside WT); the convention of the BraTS
    post-processing is applied: WT sets oedema, TC inside it becomes necrotic core, ET inside that
    becomes enhancing. An ET or TC voxel outside WT is therefore dropped rather than invented.
    """
    regions = np.asarray(regions).astype(bool)
    if regions.ndim != 4 or regions.shape[0] != len(REGIONS):
        raise ValueError(f"expected region masks of shape (3, X, Y, Z), got {regions.shape}")
    tc, wt, et = (regions[REGIONS.index(r)] for r in ("TC", "WT", "ET"))
    labels = np.zeros(regions.shape[1:], dtype=np.uint8)
    labels[wt] = OEDEMA
    labels[wt & tc] = NECROTIC_CORE
    labels[wt & tc & et] = ENHANCING
    return labels


def invalid_labels(seg: np.ndarray) -> list[float]:
    """Values in a segmentation that are not FeTS labels (empty list when the map is valid)."""
    values = np.unique(np.asarray(seg))
    return [v.item() for v in values if v not in VALID_LABELS]
