"""Export one job folder per algorithm (``make jobs``), ready for ``submit_job`` / ``nvflare job submit``.

Each folder is configuration only: the sites and the server run the installed fedref-seg package of the
version the job names, and the job names no path of the machine that exported it (each site reads its data
folder from its own kit, see docs/operations.md). Every hyperparameter is written out in the configs,
defaults included, so that it can be read and edited there.

    python -m fedseg.jobs.export [--out jobs] [--rounds N] [--sites site-1 site-2 site-3] [--profile demo|fets2022]
                          [--quantization float16] [--byoc]
                          [--resume-job JOB_ID [--planned-rounds N] --algorithms fedref]

``--byoc`` also puts the ``fedseg`` package in the job's custom folders (bring-your-own-code), for POC or
experiments on sites without it installed; a hospital's site policy refuses such jobs.

``--resume-job`` continues a stopped FedRef job: ``--rounds`` more rounds, or with ``--planned-rounds`` only
those still to do of that total (the server knows where the run stopped). ``fedseg resume <job id>`` writes
and submits such a job from the stopped job itself.

``--profile`` picks the sites' training settings (``fedseg.settings``): the committed jobs use ``demo``;
``fets2022`` is the full-size FeTS2022 profile (128^3 crops, bounded local steps and validation).

``--quantization`` adds NVFlare's quantisation filters to the training transfer (see ``fedseg.wire``);
the committed jobs are full precision.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace

from fedseg.jobs.recipes import ALGORITHMS, PERSISTOR_ID, REPO_ROOT, JobSettings, build_recipe
from fedseg.settings import DEFAULT_PROFILE, PROFILES
from fedseg.wire import QUANTIZATION_TYPES

JOBS_DIR = os.path.join(REPO_ROOT, "jobs")
# controller argument -> JobSettings field: every FedRef setting is written out, defaults included
FEDREF_ARGS = {
    "buffer_size": "buffer_size",
    "lambda1": "lambda1",
    "lambda2": "lambda2",
    "reference_weighting": "reference_weighting",
    "lambda2_factor": "lambda2_factor",
    "lambda2_every": "lambda2_every",
    "lambda2_max": "lambda2_max",
    "variant": "fedref_variant",
    "momentum": "fedref_momentum",
    "alpha_max": "fedref_alpha_max",
}


def _explicit_server_args(job_dir: str, settings: JobSettings) -> None:
    """Write every controller setting into the server config (the exporter leaves out default values)."""
    for path in _config_files(job_dir, "config_fed_server.json"):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        for workflow in config.get("workflows", []):
            if workflow.get("id") != "controller":
                continue
            args = workflow.setdefault("args", {})
            args["num_rounds"] = settings.num_rounds  # FLARE's default (5) would be left out; `fedseg resume` reads it
            args["min_clients"] = settings.min_clients
            args["wait_after_min_seconds"] = settings.wait_after_min_seconds
            if args.get("source_model", "") is None:  # FedOpt optimises the persistor's network: no model to name
                del args["source_model"]
            if settings.algorithm == "fedref":
                for name, setting in FEDREF_ARGS.items():
                    args[name] = getattr(settings, setting)
            workflow["args"] = dict(sorted(args.items()))
        for component in config.get("components", []):
            if component.get("id") == PERSISTOR_ID:  # the network the server builds: channels and seed, always
                component["args"] = {"channels": list(settings.channels), "init_seed": settings.seed}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=4)
            f.write("\n")


def _config_files(job_dir: str, name: str) -> list[str]:
    return sorted(os.path.join(d, name) for d, _, files in os.walk(job_dir) if name in files)


def _clean(job_dir: str) -> None:
    for folder, dirs, files in os.walk(job_dir, topdown=False):
        for d in dirs:
            if d == "__pycache__":
                shutil.rmtree(os.path.join(folder, d))
        for f in files:
            if f.endswith(".pyc"):
                os.remove(os.path.join(folder, f))


def export_job(settings: JobSettings, out_dir: str) -> str:
    """Export one job into ``out_dir/<algorithm>`` (replaced atomically); returns its path."""
    target = os.path.join(out_dir, settings.algorithm)
    os.makedirs(out_dir, exist_ok=True)
    recipe = build_recipe(settings)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        recipe.export(tmp)
        exported = os.path.join(tmp, settings.job_name)
        _explicit_server_args(exported, settings)
        _clean(exported)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(exported, target)
    return target


def default_settings(
    algorithm: str,
    rounds: int = 10,
    sites: Sequence[str] = ("site-1", "site-2", "site-3"),
    quantization: str | None = None,
    profile: str = DEFAULT_PROFILE,
    byoc: bool = False,
) -> JobSettings:
    """The committed jobs: a profile's training settings, no data or cache path (each site sets its own)."""
    return JobSettings.for_profile(
        profile,
        algorithm=algorithm,
        sites=list(sites),
        num_rounds=rounds,
        data_root=None,
        threads=0,
        quantization=quantization,
        byoc=byoc,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=JOBS_DIR)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sites", nargs="+", default=["site-1", "site-2", "site-3"])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--quantization", choices=QUANTIZATION_TYPES, help="compress the training transfer")
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE, help="the sites' training settings"
    )
    parser.add_argument("--byoc", action="store_true", help="ship the fedseg package in the job (POC, experiments)")
    parser.add_argument(
        "--resume-job",
        metavar="JOB_ID",
        help="fedref: continue this stopped job (the server finds its checkpoints in its own store)",
    )
    parser.add_argument(
        "--planned-rounds",
        type=int,
        metavar="N",
        help="with --resume-job: the total rounds the run is to reach; the server runs only those still to do "
        "(instead of --rounds more)",
    )
    args = parser.parse_args(argv)
    if args.resume_job and args.algorithms != ["fedref"]:
        parser.error("--resume-job continues a fedref run: give --algorithms fedref")
    if args.planned_rounds is not None and not args.resume_job:
        parser.error("--planned-rounds is the total of a continued run: give --resume-job")
    os.makedirs(args.out, exist_ok=True)
    for algorithm in args.algorithms:
        settings = default_settings(algorithm, args.rounds, args.sites, args.quantization, args.profile, args.byoc)
        if args.resume_job:
            settings = replace(settings, resume_job=args.resume_job, planned_rounds=args.planned_rounds)
        print(export_job(settings, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
