"""``fedseg`` / ``python -m fedseg.app``: the commands behind the Makefile.

synth     synthetic FeTS2022-layout data (MNI152 anatomy, non-IID institutions)
prepare   FeTS2022 folder + partitioning CSV -> one prepared folder per FLARE site
simulate  run a federation in FLARE's simulator
report    the HTML/CSV/JSON report of a finished run
resume    continue a stopped FedRef job of a provisioned federation, from the researcher's admin kit
testbed   (root) hosts in network namespaces with shaped, cuttable links, to rehearse a federation on one machine
demo      all of the above on synthetic data, with settings that learn on a CPU in minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from fedseg.data_prep.cli import add_fets2022_arguments, add_synth_arguments
from fedseg.fedref import VARIANTS
from fedseg.settings import DEFAULT_PROFILE, PROFILES, add_training_arguments, profile, settings_from_arguments

DEMO_ROUNDS = 20
ALGORITHM_NAMES = ("fedref", "fedavg", "fedprox", "fedadam", "fedavgm", "scaffold")


def _progress(label: str):
    def show(done: int, total: int, name: str) -> None:
        end = "\n" if done == total else ""
        print(f"\r{label}: {done}/{total} ({name})", end=end, flush=True)

    return show


def cmd_synth(args: argparse.Namespace) -> int:
    from fedseg.data_prep.cli import run_synth

    return run_synth(args, progress=_progress("synthetic subjects"))


def cmd_prepare(args: argparse.Namespace) -> int:
    from fedseg.data_prep.cli import run_fets2022

    return run_fets2022(args)


def _settings(args: argparse.Namespace):
    """The run's JobSettings: the chosen profile, with every training option given on the command line over it."""
    from fedseg.jobs.recipes import JobSettings

    training = settings_from_arguments(args, profile(args.profile))
    return JobSettings(
        **training,
        profile=args.profile,
        algorithm=args.algorithm,
        sites=args.sites,
        num_rounds=args.rounds,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        buffer_size=args.p,
        lambda1=args.lambda1,
        lambda2=args.lambda2,
        reference_weighting=args.reference_weighting,
        cross_site_eval=not args.no_cross_site_eval,
        quantization=args.quantization,
        fedref_variant=args.fedref_variant,
        fedref_momentum=args.fedref_momentum,
        clients_per_round=args.clients_per_round,
        min_clients=args.min_clients,
        wait_after_min_seconds=args.wait_after_min_seconds,
        dead_site_seconds=args.dead_site_seconds,
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedseg.jobs.recipes import run_simulation

    settings = _settings(args)
    run = run_simulation(settings, args.workspace, data_source=os.path.abspath(args.data_root))
    print(f"job {settings.job_name}: COMPLETED, {settings.num_rounds} of {settings.num_rounds} rounds")
    print(f"run folder: {run}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedseg.app.artifacts import load_run
    from fedseg.app.report import write_report

    index = write_report(load_run(args.run), args.out or os.path.join(args.run, "report"))
    print(f"report: {index}")
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


def cmd_compare(args: argparse.Namespace) -> int:
    """Run each algorithm on the same data and settings (or take finished runs), then compare them."""
    from fedseg.app.compare import write_comparison
    from fedseg.jobs.recipes import SimulationError, run_simulation

    folders = list(args.runs or [])
    failed = []
    if not folders:
        if not args.data_root:
            raise ValueError("give --data-root (to run the algorithms) or --runs (finished run folders)")
        seeds = args.seeds or [None]  # None: the --seed option (or the profile's seed)
        plan = [(algorithm, seed) for seed in seeds for algorithm in args.algorithms]
        for number, (algorithm, seed) in enumerate(plan, start=1):
            args.algorithm = algorithm
            settings = _settings(args)
            if seed is not None:  # one run folder per seed: the comparison pairs them seed by seed
                settings.seed, settings.name = seed, f"{settings.job_name}_seed{seed}"
            print(
                f"[{number}/{len(plan)}] {algorithm} (seed {settings.seed}): {settings.num_rounds} rounds on "
                f"{', '.join(settings.sites)}",
                flush=True,
            )
            try:
                folders.append(run_simulation(settings, args.workspace, data_source=os.path.abspath(args.data_root)))
            except SimulationError as exc:
                print(f"  {algorithm} failed: {exc}", file=sys.stderr)
                failed.append(algorithm)
    index = write_comparison(folders, args.out, target=args.target)
    print(f"comparison: {index}")
    return 1 if failed else 0


def _seed(args: argparse.Namespace) -> int:
    return args.seed if args.seed is not None else profile(args.profile).seed


def _demo_sites(out: str, seed: int) -> tuple[str, str]:
    """Synthetic FeTS data and its three prepared sites under ``out`` (reused when already there)."""
    from fedseg.data_prep.fets2022 import prepare_sites
    from fedseg.data_prep.synthetic import SyntheticConfig, generate

    print(f"synthetic FeTS2022 data in {out}/data")
    source = generate(os.path.join(out, "data"), SyntheticConfig(seed=seed), progress=_progress("  subjects"))
    print(f"site partitions in {out}/sites")
    for r in prepare_sites(source, os.path.join(out, "sites"), seed=seed):
        print(f"  {r.site}: {r.training} training / {r.validation} validation cases")
    return source, os.path.join(out, "sites")


def _poc_demo_sites(demo_dir: str, seed: int) -> str:
    """The demo's site folders for a POC run without ``--data-root``.

    Sites already prepared under ``demo_dir`` (by ``make demo`` or an earlier ``make poc``) are used as they
    are; otherwise the demo's data and sites are made there, so that the demo and the POC share one copy
    whichever runs first.
    """
    from fedseg.app.poc import prepared_sites

    sites = os.path.join(os.path.abspath(demo_dir), "sites")
    try:
        names = prepared_sites(sites)
    except ValueError:  # none prepared yet
        return _demo_sites(os.path.abspath(demo_dir), seed)[1]
    print(f"using the prepared sites in {sites}: {', '.join(names)}")
    return sites


def cmd_poc(args: argparse.Namespace) -> int:
    """A POC federation (separate server and site processes) on prepared data, then the report."""
    from dataclasses import replace

    from fedseg.app.artifacts import load_run
    from fedseg.app.poc import JobFailed, prepared_sites, resume_settings, run_poc
    from fedseg.app.report import write_report

    out = os.path.abspath(args.out)
    if not args.data_root:
        args.data_root = _poc_demo_sites(args.demo_dir, _seed(args))
    args.sites = args.sites or prepared_sites(args.data_root)
    settings = _settings(args)
    if args.resume_from:
        settings = resume_settings(replace(settings, resume_from=os.path.abspath(args.resume_from)), out)
    try:
        run, failure = run_poc(settings, args.data_root, os.path.join(out, "workspace")), None
    except JobFailed as exc:  # still reported: what the rounds that ran show, and why it stopped
        run, failure = exc.run_folder, exc
    if run:
        try:
            print(f"report: {write_report(load_run(run), os.path.join(out, 'report'))}")
        except RuntimeError as exc:  # e.g. no round finished: nothing to report
            print(f"no report: {exc}", file=sys.stderr)
    if failure:
        print(f"fedseg poc: {failure}", file=sys.stderr)
        return 1
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Segment one case with a trained global model."""
    from fedseg.app.infer import network_settings, segment, volumes_json

    if args.run:
        model, config, roi = network_settings(args.run)
    elif args.model:
        model, roi = args.model, args.roi
        config = {"channels": args.channels, "strides": [2] * (len(args.channels) - 1)}
    else:
        raise ValueError("give --run (a finished run folder) or --model (a checkpoint) and --channels")
    case = args.case[0] if len(args.case) == 1 else args.case
    result = segment(case, model, args.out, config, roi=args.roi or roi, overlay=args.overlay)
    print(f"segmentation: {os.path.abspath(result.output)}")
    if result.overlay:
        print(f"overlay: {os.path.abspath(result.overlay)}")
    print(f"volumes (ml): {volumes_json(result)}")
    return 0


def _segment_one_validation_case(run: str, site_folder: str, out: str) -> str:
    """Segment the first validation case of a site with the run's final model; returns the overlay PNG."""
    from fedseg.app.infer import network_settings, segment
    from fedseg.data import load_site_datalist

    _, validation = load_site_datalist(site_folder)
    case = validation[0]
    sid = os.path.basename(os.path.dirname(case["label"]))
    model, config, roi = network_settings(run)
    result = segment(
        case["image"],
        model,
        os.path.join(out, f"{sid}_seg.nii.gz"),
        config,
        roi=roi,
        overlay=os.path.join(out, f"{sid}_overlay.png"),
    )
    print(f"  {sid}: segmentation {result.output}, whole tumour {result.volumes_ml['WT']:.1f} ml")
    return result.overlay


def cmd_install_policy(args: argparse.Namespace) -> int:
    from fedseg.app.kit_policy import install_policy, planned_files

    if args.show:
        print(json.dumps(planned_files(args.kit, args.data_root, args.cache_dir, args.store), indent=2))
        return 0
    for path in install_policy(args.kit, args.data_root, args.cache_dir, args.store, force=args.force):
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic data -> 3 sites -> FedRef in the simulator -> report."""
    from fedseg.app.artifacts import load_run
    from fedseg.app.report import build_summary, write_report
    from fedseg.jobs.recipes import run_simulation

    out = os.path.abspath(args.out)
    started = time.time()
    print("[1-2/4] ", end="")
    source, args.data_root = _demo_sites(out, _seed(args))
    args.sites = [f"site-{i}" for i in range(1, 4)]
    settings = _settings(args)
    print(
        f"[3/4] {settings.algorithm} federation, {settings.num_rounds} rounds, in the FLARE simulator "
        f"(logs: {out}/workspace/{settings.job_name})"
    )
    run = run_simulation(settings, os.path.join(out, "workspace"), data_source=f"synthetic ({source})")
    print("[4/4] report, and one validation case segmented by the final model")
    artifacts = load_run(run)
    overlay = _segment_one_validation_case(run, os.path.join(out, "sites", "site-1"), os.path.join(out, "segmentation"))
    index = write_report(artifacts, os.path.join(out, "report"), overlay=overlay)
    overall = build_summary(artifacts)["final"]["overall"]
    print(
        f"final global model, all validation cases: Dice TC {overall['dice_tc']:.3f}  WT {overall['dice_wt']:.3f}  "
        f"ET {overall['dice_et']:.3f}  mean {overall['dice_mean']:.3f}   ({time.time() - started:.0f} s)"
    )
    print(f"report: {index}")
    return 0


def _job_default(name: str):
    from fedseg.jobs.recipes import JobSettings

    return JobSettings.__dataclass_fields__[name].default


def _add_training_options(p: argparse.ArgumentParser, rounds: int) -> None:
    """The run's options; the sites' training options come from ``fedseg.settings`` (one per field)."""
    p.add_argument("--algorithm", choices=ALGORITHM_NAMES, default=_job_default("algorithm"))
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help="named training settings: demo (synthetic 64x64x48) or fets2022 (full-size FeTS2022); "
        "the options below override single values",
    )
    p.add_argument(
        "--cache-dir",
        help="where the sites cache decoded cases (default: each site's FEDSEG_CACHE_DIR, "
        "else fedseg_cache in its workspace)",
    )
    add_training_arguments(p, None, dashes=True)
    p.add_argument(
        "--p", type=int, default=_job_default("buffer_size"), help="FedRef: global models in the reference buffer"
    )
    p.add_argument(
        "--lambda1", type=float, default=_job_default("lambda1"), help="FedRef: pull toward the last global model"
    )
    p.add_argument(
        "--lambda2", type=float, default=_job_default("lambda2"), help="FedRef: pull toward the reference model"
    )
    p.add_argument("--reference-weighting", choices=["uniform", "linear"], default=_job_default("reference_weighting"))
    p.add_argument(
        "--fedref-variant",
        choices=VARIANTS,
        default=_job_default("fedref_variant"),
        help="FedRef's prior: mean of the last p globals, their trend one round ahead, or a per-layer "
        "(diagonal) prior on the trend",
    )
    p.add_argument(
        "--fedref-momentum",
        type=float,
        default=_job_default("fedref_momentum"),
        help="FedRef: server momentum before the MAP pull (0: none)",
    )
    p.add_argument(
        "--clients-per-round",
        type=int,
        default=_job_default("clients_per_round"),
        help="sites trained per round, drawn from the seed and the round (0: every site every round)",
    )
    p.add_argument("--no-cross-site-eval", action="store_true")
    p.add_argument(
        "--min-clients",
        type=int,
        default=_job_default("min_clients"),
        help="answers a round needs, and sites the job needs alive (default: a majority of the sites)",
    )
    p.add_argument(
        "--wait-after-min-seconds",
        type=int,
        default=_job_default("wait_after_min_seconds"),
        help="how long a round waits for the other sites once --min-clients have answered",
    )
    p.add_argument(
        "--dead-site-seconds",
        type=int,
        default=_job_default("dead_site_seconds"),
        help="how long the server waits before it treats a site whose job process is gone as dead",
    )
    p.add_argument(
        "--quantization",
        choices=["float16", "blockwise8", "float4", "normfloat4"],
        help="compress the training transfer with NVFlare's quantisation filters (8/4-bit need a GPU)",
    )


RUN_COMMANDS = ("simulate", "compare", "poc", "demo")  # the commands that take the run's options (JobSettings)


def build_parser(run_options: bool = True) -> argparse.ArgumentParser:
    """The ``fedseg`` parser; without ``run_options`` the run commands' training options are left out (their
    defaults come from JobSettings, whose FLARE and MONAI imports take seconds), for the other commands."""
    add_run_options = _add_training_options if run_options else (lambda parser, rounds: None)
    parser = argparse.ArgumentParser(
        prog="fedseg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic FeTS2022-layout data")
    add_synth_arguments(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="FeTS2022 folder + partitioning CSV -> checked per-site folders")
    add_fets2022_arguments(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("simulate", help="run a federation in FLARE's simulator")
    p.add_argument("--data-root", required=True, help="folder of prepared site folders")
    p.add_argument("--sites", nargs="+", default=["site-1", "site-2", "site-3"])
    p.add_argument("--workspace", default="workspace")
    add_run_options(p, rounds=10)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("compare", help="run several algorithms on the same data and compare them")
    p.add_argument("--data-root", help="folder of prepared site folders (runs every algorithm)")
    p.add_argument("--runs", nargs="+", help="finished run folders to compare instead of running")
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHM_NAMES), choices=ALGORITHM_NAMES)
    p.add_argument("--sites", nargs="+", default=["site-1", "site-2", "site-3"])
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
    add_run_options(p, rounds=DEMO_ROUNDS)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("poc", help="run the job in a POC federation: server and sites as separate processes")
    p.add_argument("--data-root", help="prepared site folders (default: the demo's sites, see --demo-dir)")
    p.add_argument("--sites", nargs="+", help="default: every prepared site folder")
    p.add_argument("--out", default="poc_output")
    p.add_argument(
        "--demo-dir",
        default="demo_output",
        help="without --data-root: the demo's output folder; its sites are used if prepared, else made there",
    )
    p.add_argument(
        "--resume-from",
        help="continue a stopped FedRef run from its last global model and reference "
        "buffer (a folder holding them, e.g. the stopped run's --out); --rounds is "
        "then the total the run should reach",
    )
    add_run_options(p, rounds=5)
    p.set_defaults(func=cmd_poc)

    p = sub.add_parser("infer", help="segment a case (FeTS subject folder or t1 t1ce t2 flair files)")
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
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("report", help="write the report of a finished run")
    p.add_argument("run", help="the run folder (simulator: <workspace>/<job name>)")
    p.add_argument("--out", default=None, help="report folder (default: <run>/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("resume", help="continue a stopped FedRef job of a provisioned federation (Flare API)")
    p.add_argument("job_id", help="the stopped job's id (list_jobs)")
    p.add_argument(
        "--startup-kit", required=True, help="the researcher's admin kit folder, e.g. <prod>/researcher@fedseg.org"
    )
    p.add_argument("--user", help="the admin user (default: the kit folder's name)")
    p.add_argument("--wait", action="store_true", help="wait for the continued job; exit 1 unless FINISHED:COMPLETED")
    p.add_argument("--timeout", type=float, default=0.0, help="with --wait: the most seconds to wait (0: no limit)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("testbed", help="(root) network hosts on this machine: namespaces, names, shaped links")
    p.add_argument("action", choices=["up", "down", "list"])
    p.add_argument("name", nargs="?", default="fed", help="the testbed's name (1-8 letters/digits; default fed)")
    p.add_argument("--hosts", nargs="+", default=["server", "site-1", "site-2", "site-3", "admin"])
    p.add_argument(
        "--rate", action="append", metavar="HOST=RATE", help="shape a host's link both ways, e.g. site-1=20mbit"
    )
    p.set_defaults(func=cmd_testbed)

    p = sub.add_parser("install-policy", help="FedRef-Seg's site or server policy files into a startup kit's local/")
    p.add_argument("kit", help="the startup kit folder (a site's or the server's)")
    p.add_argument("--data-root", help="site: the folder holding this site's prepared folder (<data-root>/<site>)")
    p.add_argument("--cache-dir", help="site: where decoded cases are cached (default: fedseg_cache in the workspace)")
    p.add_argument("--store", help="server: folder of the job store and snapshots (default: <kit>/store)")
    p.add_argument("--force", action="store_true", help="replace policy files that differ (old ones kept)")
    p.add_argument("--show", action="store_true", help="print the files instead of writing them")
    p.set_defaults(func=cmd_install_policy)

    p = sub.add_parser("demo", help="synthetic data, 3 sites, FedRef in the simulator, report")
    p.add_argument("--out", default="demo_output")
    add_run_options(p, rounds=DEMO_ROUNDS)
    p.set_defaults(func=cmd_demo)
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
