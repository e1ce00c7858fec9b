"""FeTS2022 preparation and synthetic data: the arguments and runs of ``fedseg prepare`` and ``fedseg synth``.

``fedseg prepare`` is the documented name. ``python -m fedseg.data_prep fets2022`` (and ``... synth``) is an alias:
it runs ``fedseg prepare`` (``fedseg synth``) itself, so the two print the same and exit the same.

Exit status: 0 when at least one site was prepared (rejections are reported, not fatal); 1 when the CSV
is unusable, no site has data, or ``--strict`` met a rejection; 2 for wrong arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fedseg.data_prep.materialise import MODES


def add_fets2022_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="the MICCAI_FeTS2022_TrainingData folder (read only, never written)")
    p.add_argument("--out", required=True, help="output folder: one folder per site, rejected.csv, prep_summary.json")
    p.add_argument("--csv", default=None, help="partitioning CSV (default: partitioning_1.csv inside the data folder)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--partitions", type=int, nargs="+", help="partition ids that become sites (default: all)")
    which.add_argument("--largest", type=int, metavar="N", help="the N partitions with the most subjects")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each site's subjects for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the training/validation split")
    p.add_argument(
        "--name-template",
        default="site-{n}",
        help="site folder = FLARE client name; {n}: 1-based index of the site, {partition}: partition id",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="link",
        help="link: symlinks (default); copy: copies; preprocess: crop to the brain, store compactly",
    )
    p.add_argument("--workers", type=int, default=None, help="processes reading subjects (default: all cores)")
    p.add_argument("--strict", action="store_true", help="fail (and change no site folder) on any rejection")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_fets2022(args: argparse.Namespace) -> int:
    from fedseg.data_prep.fets2022 import PartitionCsvError, PrepError, format_summary, prepare

    try:
        result = prepare(
            args.data,
            args.out,
            csv_path=args.csv,
            partitions=args.partitions,
            largest=args.largest,
            validation_fraction=args.val_fraction,
            seed=args.seed,
            name_template=args.name_template,
            mode=args.mode,
            workers=args.workers,
            strict=args.strict,
            show_progress=not args.quiet,
        )
    except (PrepError, PartitionCsvError, ValueError) as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result))
    print(f"sites in {os.path.abspath(args.out)}")
    return 0


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (MICCAI_FeTS2022_TrainingData is written inside)")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48], help="volume size in voxels")
    p.add_argument("--seed", type=int, default=0, help="seed of the anatomy, tumours and scanner effects")


def run_synth(args: argparse.Namespace, progress=None) -> int:
    from fedseg.data_prep.synthetic import SyntheticConfig, generate

    folder = generate(args.out, SyntheticConfig(shape=tuple(args.shape), seed=args.seed), progress=progress)
    print(f"synthetic FeTS2022 data: {folder}")
    return 0


ALIASES = {"fets2022": "prepare", "synth": "synth"}  # python -m fedseg.data_prep COMMAND -> fedseg COMMAND


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedseg.data_prep fets2022|synth ...``: ``fedseg prepare|synth ...``, the canonical commands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ALIASES:
        from fedseg.app.cli import main as fedseg_main

        return fedseg_main([ALIASES[argv[0]], *argv[1:]])
    parser = argparse.ArgumentParser(
        prog="python -m fedseg.data_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for alias, command in ALIASES.items():
        sub.add_parser(alias, help=f"alias of `fedseg {command}` (see `fedseg {command} --help`)")
    parser.parse_args(argv)  # --help, or an unknown command: argparse says so and exits
    return 2
