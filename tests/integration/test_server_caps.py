"""A job over the server's caps, run in the real simulator: it ends before any round, with the reason in the log."""

from __future__ import annotations

import pytest


def test_a_job_over_the_caps_ends_in_the_simulator_before_any_round(two_sites, tmp_path):
    from helpers.federations import simulate

    from fedseg.jobs.recipes import SimulationError

    with pytest.raises(SimulationError, match="0 of 2 rounds"):
        simulate(two_sites, tmp_path, algorithm="fedavg", channels=(8, 1024))
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "fedseg_fedavg" / "server").rglob("log.txt"))
    assert "channels = 1024 exceeds the server's cap max_channels = 512 (the server defaults)" in logs
    assert not list((tmp_path / "fedseg_fedavg").rglob("FL_global_model.pt"))  # no network was built or saved
