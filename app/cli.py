"""``fedseg`` / ``python -m fedseg.app``: the commands behind the Makefile (``fedseg --help`` lists them all).

Each command is one line of ``COMMANDS``: its name, what it does, its own arguments and its handler, a thin
entry over the operation it calls. The run commands (simulate, compare, poc, demo) also take every job and
training option, made from the settings' fields (``fedseg.jobs.settings``); for the other commands the parser is
built without them, which starts in half a second instead of importing NVFlare first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from fedseg.data_prep.cli import add_fets2022_arguments, add_synth_arguments
from fedseg.settings import DEFAULT_PROFILE, DEFAULT_SITES, PROFILES

RUN_COMMANDS = ("simulate", "compare", "poc", "demo")  # the commands that take the run's options (JobSettings)


def _job_settings(args: argparse.Namespace, **fixed):
    from fedseg.jobs.options import job_settings

    return job_settings(args, args.command, **fixed)


def cmd_synth(args: argparse.Namespace) -> int:
    from fedseg.app.demo import progress
    from fedseg.data_prep.cli import run_synth

    return run_synth(args, progress=progress("synthetic subjects"))


def cmd_prepare(args: argparse.Namespace) -> int:
    from fedseg.data_prep.cli import run_fets2022

    return run_fets2022(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedseg.jobs.simulate import run_simulation

    settings = _job_settings(args)
    run = run_simulation(settings, args.workspace, data_source=settings.data_root)
    print(f"job {settings.job_name}: COMPLETED, {settings.num_rounds} of {settings.num_rounds} rounds")
    print(f"run folder: {run}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Run each algorithm on the same data and settings (or take finished runs), then compare them."""
    from fedseg.app.runs import compare

    settings = None if args.runs else _job_settings(args, algorithm=args.algorithms[0])
    return compare(settings, args.algorithms, args.seeds, args.workspace, args.out, args.target, runs=args.runs)


def cmd_poc(args: argparse.Namespace) -> int:
    """A POC federation on prepared sites (default: the demo's, made if missing), then the report."""
    from fedseg.app.demo import poc_demo_sites
    from fedseg.app.poc import prepared_sites
    from fedseg.app.runs import poc

    data_root = args.data_root or poc_demo_sites(args.demo_dir, _job_settings(args).seed)
    return poc(_job_settings(args, data_root=data_root, sites=args.sites or prepared_sites(data_root)), args.out)


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data -> 3 sites -> FedRef in the simulator -> report."""
    from fedseg.app.demo import run_demo

    out = os.path.abspath(args.out)
    return run_demo(_job_settings(args, data_root=os.path.join(out, "sites"), sites=list(DEFAULT_SITES)), out)


def cmd_infer(args: argparse.Namespace) -> int:
    """Segment one case with a trained global model."""
    from fedseg.app.infer import network_settings, segment, volumes_json
    from fedseg.network import network_config

    if args.run:
        model, config, roi = network_settings(args.run)
    elif args.model:
        model, config, roi = args.model, network_config(args.channels), args.roi
    else:
        raise ValueError("give --run (a finished run folder) or --model (a checkpoint) and --channels")
    case = args.case[0] if len(args.case) == 1 else args.case
    result = segment(case, model, args.out, config, roi=args.roi or roi, overlay=args.overlay)
    print(f"segmentation: {os.path.abspath(result.output)}")
    if result.overlay:
        print(f"overlay: {os.path.abspath(result.overlay)}")
    print(f"volumes (ml): {volumes_json(result)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedseg.app.artifacts import load_run
    from fedseg.app.report import write_report

    index = write_report(load_run(args.run), args.out or os.path.join(args.run, "report"))
    print(f"report: {index}")
    return 0


def cmd_export_bundle(args: argparse.Namespace) -> int:
    """Write a run's global model as a MONAI bundle, with its model card."""
    from fedseg.app.bundle import describe, export_bundle

    print(describe(export_bundle(args.run, args.out, model=args.model, force=args.force, data=args.data)))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a stopped FedRef job: the same job, resumed by the server from its own checkpoints."""
    from fedseg.app.resume import run

    return run(args.job_id, args.startup_kit, args.user, wait=args.wait, timeout=args.timeout)


def cmd_testbed(args: argparse.Namespace) -> int:
    """Bring a testbed of network hosts up or down, or list the ones that are up."""
    from fedseg.app import testbed

    try:
        if args.action == "up":
            made = testbed.up(args.name, args.hosts, testbed.parse_rates(args.rate or []), owner_pid=0)
            print(testbed.describe(made))
        elif args.action == "down":
            testbed.down(args.name)
            print(f"testbed {args.name}: removed")
        else:
            for name in testbed.names():
                print(testbed.describe(testbed.Testbed.load(name)))
    except testbed.TestbedError as exc:
        print(f"fedseg testbed: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_install_policy(args: argparse.Namespace) -> int:
    from fedseg.app.kit_policy import install_policy, planned_files

    if args.show:
        print(json.dumps(planned_files(args.kit, args.data_root, args.cache_dir, args.store), indent=2))
        return 0
    for path in install_policy(args.kit, args.data_root, args.cache_dir, args.store, force=args.force):
        print(f"wrote {path}")
    return 0


def _simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default="workspace", help="the simulator's workspace: one run folder per job")


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", nargs="+", help="finished run folders to compare instead of running")
    p.add_argument("--workspace", default="workspace_compare")
    p.add_argument("--out", default="comparison")
    p.add_argument("--target", type=float, default=0.8, help="mean Dice whose first reaching is counted")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run every algorithm once per seed; differences to FedAvg are then paired by seed, with a 95%% "
        "interval (default: one run at --seed)",
    )


def _poc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="poc_output")
    p.add_argument(
        "--demo-dir",
        default="demo_output",
        help="without --data-root: the demo's output folder; its sites are used if prepared, else made there",
    )


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_output")


def _infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("case", nargs="+", help="a FeTS subject folder, or the four files in the order t1 t1ce t2 flair")
    p.add_argument("--run", help="a finished run folder (finds the global model and the network settings)")
    p.add_argument("--model", help="a checkpoint (FL_global_model.pt) instead of --run")
    p.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=list(PROFILES[DEFAULT_PROFILE].channels),
        help="network channels (with --model)",
    )
    p.add_argument("--roi", type=int, nargs=3, default=None, help="sliding-window size (default: the run's crop)")
    p.add_argument("--out", required=True, help="output segmentation .nii.gz")
    p.add_argument("--overlay", help="also write an overlay PNG here")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the run folder (simulator: <workspace>/<job name>)")
    p.add_argument("--out", default=None, help="report folder (default: <run>/report)")


def _export_bundle_arguments(p: argparse.ArgumentParser) -> None:
    from fedseg.app.bundle import CHECKPOINTS, DATA_KINDS

    p.add_argument("run", help="the run folder (simulator: <workspace>/<job name>)")
    p.add_argument("--out", required=True, help="the bundle's folder (refused when not empty, unless --force)")
    p.add_argument(
        "--model", choices=list(CHECKPOINTS), default="final", help="the final global model, or the best one FLARE kept"
    )
    p.add_argument("--force", action="store_true", help="replace a folder that is not empty")
    p.add_argument("--data", choices=DATA_KINDS, help="what the sites trained on, when the run does not record it")


def _resume_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", help="the stopped job's id (list_jobs)")
    p.add_argument(
        "--startup-kit", required=True, help="the researcher's admin kit folder, e.g. <prod>/researcher@fedseg.org"
    )
    p.add_argument("--user", help="the admin user (default: the kit folder's name)")
    p.add_argument("--wait", action="store_true", help="wait for the continued job; exit 1 unless FINISHED:COMPLETED")
    p.add_argument("--timeout", type=float, default=0.0, help="with --wait: the most seconds to wait (0: no limit)")


def _testbed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "list"])
    p.add_argument("name", nargs="?", default="fed", help="the testbed's name (1-8 letters/digits; default fed)")
    p.add_argument("--hosts", nargs="+", default=["server", *DEFAULT_SITES, "admin"])
    p.add_argument(
        "--rate", action="append", metavar="HOST=RATE", help="shape a host's link both ways, e.g. site-1=20mbit"
    )


def _install_policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kit", help="the startup kit folder (a site's or the server's)")
    p.add_argument("--data-root", help="site: the folder holding this site's prepared folder (<data-root>/<site>)")
    p.add_argument("--cache-dir", help="site: where decoded cases are cached (default: fedseg_cache in the workspace)")
    p.add_argument("--store", help="server: folder of the job store and snapshots (default: <kit>/store)")
    p.add_argument("--force", action="store_true", help="replace policy files that differ (old ones kept)")
    p.add_argument("--show", action="store_true", help="print the files instead of writing them")


# (name, what it does, its own arguments, handler), in the order `fedseg --help` lists them
COMMANDS = (
    (
        "synth",
        "write synthetic FeTS2022-layout data (MNI152 anatomy, non-IID institutions)",
        add_synth_arguments,
        cmd_synth,
    ),
    (
        "prepare",
        "FeTS2022 folder + partitioning CSV -> checked per-site folders (`python -m fedseg.data_prep fets2022` "
        "is an alias)",
        add_fets2022_arguments,
        cmd_prepare,
    ),
    ("simulate", "run a federation in FLARE's simulator", _simulate_arguments, cmd_simulate),
    ("compare", "run several algorithms on the same data and compare them", _compare_arguments, cmd_compare),
    ("poc", "run the job in a POC federation: server and sites as separate processes", _poc_arguments, cmd_poc),
    ("infer", "segment a case (FeTS subject folder or t1 t1ce t2 flair files)", _infer_arguments, cmd_infer),
    ("report", "write the report of a finished run", _report_arguments, cmd_report),
    (
        "export-bundle",
        "write a run's global model as a MONAI bundle with its model card",
        _export_bundle_arguments,
        cmd_export_bundle,
    ),
    ("resume", "continue a stopped FedRef job of a provisioned federation (Flare API)", _resume_arguments, cmd_resume),
    (
        "testbed",
        "(root) network hosts on this machine: namespaces, names, shaped links",
        _testbed_arguments,
        cmd_testbed,
    ),
    (
        "install-policy",
        "FedRef-Seg's site or server policy files into a startup kit's local/",
        _install_policy_arguments,
        cmd_install_policy,
    ),
    ("demo", "synthetic data, 3 sites, FedRef in the simulator, report", _demo_arguments, cmd_demo),
)


def build_parser(run_options: bool = True) -> argparse.ArgumentParser:
    """The ``fedseg`` parser, every command in it; without ``run_options`` the run commands' job and training
    options are left out (for the other commands: they import NVFlare, which takes seconds)."""
    parser = argparse.ArgumentParser(
        prog="fedseg",
        description="FedRef-Seg: federated brain-tumour segmentation on NVIDIA FLARE (also `python -m fedseg.app`). "
        "`fedseg COMMAND --help` shows a command's options.",
        epilog="Job folders for a provisioned federation: `python -m fedseg.jobs.export` (`make jobs`).",
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for name, what, arguments, handler in COMMANDS:
        p = sub.add_parser(name, help=what, description=what)
        arguments(p)
        if run_options and name in RUN_COMMANDS:
            from fedseg.jobs.options import add_job_arguments

            add_job_arguments(p, name)
        p.set_defaults(func=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(run_options=not argv or argv[0] in RUN_COMMANDS).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"fedseg {args.command}: {exc}", file=sys.stderr)
        return 1
