"""``fedseg demo``: synthetic data -> three prepared sites -> FedRef in FLARE's simulator -> report, one validation
case segmented by the final model and the model as a MONAI bundle (``<out>/bundle``, linked from the report); also
the demo's sites for ``fedseg poc`` without ``--data-root``.

The demo's settings are ``fedseg demo``'s options (``fedseg.jobs.settings``: the demo profile, 20 rounds, the
default sites); its data is made with the run's seed.
"""

from __future__ import annotations

import os
import time


def progress(label: str):
    """A progress callback ``(done, total, name)`` that rewrites one line of the terminal."""

    def show(done: int, total: int, name: str) -> None:
        end = "\n" if done == total else ""
        print(f"\r{label}: {done}/{total} ({name})", end=end, flush=True)

    return show


def demo_sites(out: str, seed: int) -> tuple[str, str]:
    """Synthetic FeTS data and its three prepared sites under ``out`` (reused when already there); returns
    (the data folder, the folder of the site folders)."""
    from fedseg.data_prep.fets2022 import prepare_sites
    from fedseg.data_prep.synthetic import SyntheticConfig, generate

    print(f"synthetic FeTS2022 data in {out}/data")
    source = generate(os.path.join(out, "data"), SyntheticConfig(seed=seed), progress=progress("  subjects"))
    print(f"site partitions in {out}/sites")
    for r in prepare_sites(source, os.path.join(out, "sites"), seed=seed):
        print(f"  {r.site}: {r.training} training / {r.validation} validation cases")
    return source, os.path.join(out, "sites")


def poc_demo_sites(demo_dir: str, seed: int) -> str:
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
        return demo_sites(os.path.abspath(demo_dir), seed)[1]
    print(f"using the prepared sites in {sites}: {', '.join(names)}")
    return sites


def segment_one_validation_case(run: str, site_folder: str, out: str) -> str:
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


def run_demo(settings, out: str) -> int:
    """The demo with these settings (their ``data_root`` is ``<out>/sites``, made here first) into ``out``."""
    from fedseg.app.artifacts import load_run
    from fedseg.app.bundle import export_bundle
    from fedseg.app.report import build_summary, write_report
    from fedseg.jobs.simulate import run_simulation

    out = os.path.abspath(out)
    started = time.time()
    print("[1-2/4] ", end="")
    source, sites = demo_sites(out, settings.seed)
    assert os.path.abspath(sites) == settings.data_root, (sites, settings.data_root)
    print(
        f"[3/4] {settings.algorithm} federation, {settings.num_rounds} rounds, in the FLARE simulator "
        f"(logs: {out}/workspace/{settings.job_name})"
    )
    run = run_simulation(settings, os.path.join(out, "workspace"), data_source=f"synthetic ({source})")
    print("[4/4] report, one validation case segmented by the final model, the model as a MONAI bundle")
    artifacts = load_run(run)
    first = os.path.join(sites, settings.sites[0])
    overlay = segment_one_validation_case(run, first, os.path.join(out, "segmentation"))
    bundle = export_bundle(run, os.path.join(out, "bundle"), force=True)  # replaced, as the report is
    print(f"  MONAI bundle of the final model: {bundle}")
    index = write_report(artifacts, os.path.join(out, "report"), overlay=overlay, bundle=bundle)
    overall = build_summary(artifacts)["final"]["overall"]
    print(
        f"final global model, all validation cases: Dice TC {overall['dice_tc']:.3f}  WT {overall['dice_wt']:.3f}  "
        f"ET {overall['dice_et']:.3f}  mean {overall['dice_mean']:.3f}   ({time.time() - started:.0f} s)"
    )
    print(f"report: {index}")
    return 0
