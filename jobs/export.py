"""Export one job folder per algorithm (``make jobs``), ready for ``submit_job`` / ``nvflare job submit``.

Each folder is configuration only: the sites and the server run the installed fedref-seg package of the
version the job names, and the job names no path of the machine that exported it (each site reads its data
folder from its own kit, see docs/operations.md). Every hyperparameter is written out in the configs,
defaults included, so that it can be read and edited there.

    python -m fedseg.jobs.export [--out jobs] [--algorithms fedref ...] [any job or training option]

The options are the run commands' (``fedseg simulate --help``; made from ``fedseg.jobs.settings``), less the
machine-local ones (data, cache, a stopped run's folder), plus the continuation of a stopped job:

``--resume-job`` continues a stopped FedRef job: ``--rounds`` more rounds, or with ``--planned-rounds`` only
those still to do of that total (the server knows where the run stopped). ``fedseg resume <job id>`` writes
and submits such a job from the stopped job itself.

``--byoc`` also puts the ``fedseg`` package in the job's custom folders (bring-your-own-code), for POC or
experiments on sites without it installed; a hospital's site policy refuses such jobs.

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

from fedseg.jobs.options import COMMANDS, add_job_arguments, job_settings
from fedseg.jobs.recipes import PERSISTOR_ID, REPO_ROOT, build_recipe
from fedseg.jobs.settings import JobSettings, server_arguments
from fedseg.settings import DEFAULT_PROFILE

JOBS_DIR = os.path.join(REPO_ROOT, "jobs")


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
            args.update(server_arguments(settings, group="fedref"))  # every FedRef setting, defaults included
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


def default_settings(algorithm: str, profile: str = DEFAULT_PROFILE, **overrides) -> JobSettings:
    """The committed jobs: a profile's training settings, no data or cache path (each site sets its own)."""
    return JobSettings.for_profile(profile, **{**COMMANDS["export"].defaults, "algorithm": algorithm, **overrides})


def build_parser() -> argparse.ArgumentParser:
    """The exporter's options: ``--out``, then the job and training options (``fedseg.jobs.options``)."""
    parser = argparse.ArgumentParser(
        prog="python -m fedseg.jobs.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=JOBS_DIR, help="one job folder per algorithm is written here")
    add_job_arguments(parser, "export")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume_job and args.algorithms != ["fedref"]:
        parser.error("--resume-job continues a fedref run: give --algorithms fedref")
    if args.planned_rounds is not None and not args.resume_job:
        parser.error("--planned-rounds is the total of a continued run: give --resume-job")
    os.makedirs(args.out, exist_ok=True)
    for algorithm in args.algorithms:
        print(export_job(job_settings(args, "export", algorithm=algorithm), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
