"""Shared fixtures: one tiny synthetic FeTS2022 dataset per test session, its two prepared sites, the tiny
federations run on them (each distinct setting once), and the official CSVs."""

from __future__ import annotations

import json
import os

import pytest

from fedseg.data_prep.synthetic import Institution, SyntheticConfig, generate

pytest_plugins = ["helpers.report_runs"]  # its run_folder fixture, for tests/unit and tests/integration alike
INTEGRATION_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "integration")
FETS_CSV_DIR = os.path.join(os.path.dirname(__file__), "data", "fets2022")
TINY_SHAPE = (32, 32, 24)


def tiny_config(seed: int = 0) -> SyntheticConfig:
    """Three small institutions that differ as the demo's do, on a 32x32x24 grid (seconds to train)."""
    return SyntheticConfig(
        shape=TINY_SHAPE,
        seed=seed,
        institutions=[
            Institution(subjects=4, intensity_scale=1000.0, bias_strength=0.10, noise=0.03, tumour_radius_mm=(24, 34)),
            Institution(subjects=3, intensity_scale=400.0, bias_strength=0.25, noise=0.05, tumour_radius_mm=(20, 30)),
            Institution(subjects=3, intensity_scale=2500.0, bias_strength=0.15, noise=0.04, tumour_radius_mm=(28, 38)),
        ],
    )


@pytest.fixture(scope="session")
def tiny_fets(tmp_path_factory) -> str:
    """Path of a tiny MICCAI_FeTS2022_TrainingData folder (read-only by convention: copy before changing)."""
    return generate(str(tmp_path_factory.mktemp("synthetic")), tiny_config())


@pytest.fixture(scope="session")
def two_sites(tmp_path_factory, tiny_fets) -> str:
    """Partitions 1 and 2 of the tiny data prepared as site-1 and site-2 (read-only by convention)."""
    from fedseg.data_prep.fets2022 import prepare_sites

    root = tmp_path_factory.mktemp("sites")
    prepare_sites(tiny_fets, str(root), partitions=[1, 2], validation_fraction=0.34)
    return str(root)


@pytest.fixture(scope="session")
def federation(tmp_path_factory, two_sites):
    """``federation(**settings)`` -> (job settings, run artifacts) of a tiny 2-site simulation, run once per
    distinct settings in the session: tests that read the same run share it (read-only by convention)."""
    from helpers.federations import simulate

    runs: dict[str, tuple] = {}

    def run(**settings):
        key = json.dumps(settings, sort_keys=True)
        if key not in runs:
            runs[key] = simulate(two_sites, tmp_path_factory.mktemp(settings.get("algorithm", "run")), **settings)
        return runs[key]

    return run


@pytest.fixture(scope="session")
def fedref_run(federation):
    """The shared 2-site, 2-round FedRef run (p = 2: round 1 applies the MAP step)."""
    from helpers.federations import FEDREF

    return federation(**FEDREF)


@pytest.fixture
def official_csv():
    return lambda name: os.path.join(FETS_CSV_DIR, name)


@pytest.fixture(scope="session", autouse=True)
def site_cache_outside_the_repository(tmp_path_factory):
    """Sites started by a test without a cache folder cache in a scratch folder, never in the checkout."""
    previous = os.environ.get("FEDSEG_CACHE_DIR")
    os.environ["FEDSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("site_cache"))
    yield
    if previous is None:
        os.environ.pop("FEDSEG_CACHE_DIR", None)
    else:
        os.environ["FEDSEG_CACHE_DIR"] = previous


def pytest_collection_modifyitems(config, items):
    """The marker follows the folder: every test under tests/integration/ is ``integration`` (it starts real
    processes: a FLARE federation, a browser, a network testbed or a wheel build), so ``-m "not integration"``
    runs tests/unit/ alone."""
    for item in items:
        if os.path.commonpath([str(item.path), INTEGRATION_DIR]) == INTEGRATION_DIR:
            item.add_marker(pytest.mark.integration)
