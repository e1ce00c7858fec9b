"""A site of FLARE's simulator refuses, before it trains, a Scaffold job it does not allow: the job does not
complete and the site's job log holds the one-line reason. (A job over a site's caps is refused the same way
in the provisioned federation, tests/integration/test_provisioned.py.)"""

from __future__ import annotations

import glob

import pytest

from fedseg.jobs import simulate
from fedseg.jobs.recipes import JobSettings, SimulationError, run_simulation
from fedseg.site_config import site_environment

TINY = dict(sites=["site-1", "site-2"], num_rounds=1, crop=(32, 32, 24), channels=(8, 16, 32), threads=1)


def site_logs(workspace) -> str:
    return "".join(
        open(p, encoding="utf-8").read() for p in glob.glob(f"{workspace}/**/site-*/log.txt", recursive=True)
    )


def test_a_scaffold_job_is_refused_where_the_site_does_not_allow_it(two_sites, tmp_path, monkeypatch):
    # the simulator allows Scaffold for its local sites; here they are left as a hospital's default
    monkeypatch.setattr(simulate, "site_environment", lambda *a, allow_scaffold=False, **k: site_environment(*a, **k))
    job = JobSettings(algorithm="scaffold", data_root=two_sites, local_steps=1, cross_site_eval=False, **TINY)
    with pytest.raises(SimulationError, match="FAILED"):
        run_simulation(job, str(tmp_path))
    assert "refuses the job: it is a Scaffold job" in site_logs(tmp_path)
    # NVFlare's path for an unsafe job: the site answers UNSAFE_JOB and the server aborts the job
    server_log = open(glob.glob(f"{tmp_path}/**/server/**/log.txt", recursive=True)[0], encoding="utf-8").read()
    assert "fatal return code UNSAFE_JOB" in server_log
    assert '"scaffold": 1.0' not in open(glob.glob(f"{tmp_path}/**/round_metrics.jsonl", recursive=True)[0]).read()
