"""Tiny 2-site federations in FLARE's simulator, for the tests that judge algorithms by their artifacts.

``simulate`` runs one; conftest's ``federation`` fixture runs each distinct setting once per session, so
the tests that read the same run (the FedRef closed form, its TensorBoard scalars, resuming it, repeating
it, comparing it with FedAvg) share it instead of each starting their own.
"""

from __future__ import annotations

from fedseg.app.artifacts import RunArtifacts, load_run
from fedseg.jobs.recipes import JobSettings, run_simulation

SITES = ["site-1", "site-2"]
# Two local steps a round: FedProx's proximal term is 0 at a round's first step and acts only after it.
TINY = dict(
    sites=SITES, num_rounds=2, local_steps=2, crop=(32, 32, 24), channels=(8, 16, 32), threads=1, cross_site_eval=False
)
# The shared FedRef run: p = 2, so round 0 is warm-up (plain FedAvg) and round 1 applies the MAP step.
FEDREF = dict(algorithm="fedref", buffer_size=2)


def simulate(sites: str, workspace, **settings) -> tuple[JobSettings, RunArtifacts]:
    """Run the tiny job with ``settings`` over TINY; returns its settings and what it left behind."""
    options = dict(TINY, data_root=sites)
    options.update(settings)
    job = JobSettings(**options)
    return job, load_run(run_simulation(job, str(workspace)))
