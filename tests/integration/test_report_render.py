"""The report opens offline in headless Chromium: the page renders, with its plots, and is not blank."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.render import find_chromium, screenshot

from fedseg.app.artifacts import load_run
from fedseg.app.report import write_report

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="Chromium not installed (.ci/run installs it)")


def test_report_renders_in_headless_chromium(run_folder, tmp_path):
    import matplotlib.image

    index = write_report(load_run(str(run_folder)), str(tmp_path / "report"))
    png = screenshot(index, str(tmp_path / "page.png"), width=1100, height=1600)
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] == 1600 and pixels.shape[1] == 1100
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not an empty page
    colourful = np.abs(pixels[..., 0] - pixels[..., 2]) > 0.2  # the coloured curves of the plot rendered
    assert colourful.mean() > 0.0005
