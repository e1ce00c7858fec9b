"""Where a site's training step goes: reading the cached case, its augmentation, moving it to the device, compute.

The site trainer's own pipeline and network (``fedseg.trainer.SiteTrainer``, ``fedseg.data``) on a full-size
synthetic site made as ``bench.site_scale`` makes them (240x240x155 subjects, ``--distinct`` of them behind
``--cases`` names, 80/20 split), at the ``fets2022`` profile (``--profile demo``, or any training option such as
``--crop``, ``--channels`` for smaller ones), on ``--device cpu`` or ``cuda``. One fresh process per device, after the site's cache is made:

- ``compute``: the trainer's own step (``SiteTrainer.step``) on one batch held on the device, ``--steps`` times
  after one unmeasured step: the bare compute step, the baseline of every ratio;
- each loader setting (``--settings``, e.g. ``0:off 0:on 2:on``: DataLoader workers and the trainer's loader
  thread), in a new trainer after one unmeasured step, ``--repeats`` times, in the order given, then reversed,
  and so on: a round of ``--steps`` steps (``SiteTrainer.train``), which times the data side (waiting for a
  batch on the device) and compute; its first batch is always waited for (a round of 50 steps shares it out). With 0 workers and the thread off, the data side is split by probes around the loader's dataset
  and the trainer's ``device_batch``: reading the cached case, the host stage (padding, the voxel lists of
  tumour and background), the loader's own work (sampler, collation), the device stage (crops, regions, flips,
  intensity; on a GPU with the move to it, measured alone as ``to_device``);
- validation: ``--val-rounds`` validations of the same model (per-round subset), seconds per case, and the
  input shapes the sliding-window inferer gave the network (a forward pre-hook).

``data_share`` = data seconds / training seconds of a round (the trainer's default: 0 workers, thread on);
``step_vs_compute`` = seconds per step / the bare compute step; ``validation_first_vs_later`` = the first
validation's seconds per case / the median of the later ones. Results: ``bench/results/step_split.json``, one
entry per device and profile (written as each finishes; other entries are kept, so a GPU run adds to the CPU's).

    .venv/bin/python -m bench.step_split [--device cpu|cuda] [--profile fets2022] [--steps 3] [--settings ...]
                                         [--cases 8] [--distinct 4] [--work bench/.work/step_split] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

from bench.common import (
    add_training_options,
    given_training_options,
    machine,
    save_entry,
    table,
)
from fedseg.atomic import write_json

RESULT_NAME = "step_split"
DEFAULT_SETTINGS = ("0:off", "0:on", "1:on", "2:on")  # workers:thread; "0:on" is the trainer's default
SPLIT_SETTING = "0:off"


# -- in the measuring process ----------------------------------------------------------------------------------
def new_trainer(folder: str, cache: str, settings, device: str, workers: int, thread: bool):
    """The site trainer with these settings and ``workers`` DataLoader workers, its loader thread on or off."""
    import torch

    from fedseg.settings import training_arguments
    from fedseg.trainer import SiteTrainer, parse_args

    chosen = replace(settings, num_workers=workers)
    args = parse_args(training_arguments(chosen) + ["--cache_dir", cache, "--min_val_cases", "1"])
    trainer = SiteTrainer(folder, args, device=torch.device(device))
    trainer.prefetch = thread
    return trainer


def synchronise(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def compute_step(trainer, steps: int, device: str) -> dict:
    """The bare compute step: ``SiteTrainer.step`` on one batch already on the device (first step unmeasured)."""
    batch = trainer.data.device_batch(next(iter(trainer.train_loader)), trainer.device)
    trainer.model.train()
    seconds = []
    for index in range(steps + 1):
        synchronise(device)
        started = time.perf_counter()
        trainer.step(batch["image"], batch["label"])
        synchronise(device)
        if index:
            seconds.append(time.perf_counter() - started)
    return {"seconds_per_step": statistics.median(seconds), "steps": steps}


class Probe:
    """Wraps a dataset (``[]``) or a callable so that the seconds spent in it add up in ``spent[name]``."""

    def __init__(self, inner, spent: dict, name: str, device: str = "cpu") -> None:
        self.inner, self.spent, self.name, self.device = inner, spent, name, device

    def _timed(self, call):
        started = time.perf_counter()
        out = call()
        synchronise(self.device)
        self.spent[self.name] = self.spent.get(self.name, 0.0) + time.perf_counter() - started
        return out

    def __getitem__(self, index):
        return self._timed(lambda: self.inner[index])

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, *args, **kwargs):
        return self._timed(lambda: self.inner(*args, **kwargs))


def to_device_seconds(trainer, device: str, repeats: int = 5) -> float:
    """Median seconds to move one batch of host-stage cases (image and label) to the device."""
    cases = next(iter(trainer.train_loader))
    seconds = []
    for _ in range(repeats):
        synchronise(device)
        started = time.perf_counter()
        for case in cases:
            for key in ("image", "label"):
                case[key].to(trainer.device)
        synchronise(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def loader_round(trainer, steps: int, device: str, split: bool) -> dict:
    """One round of ``steps`` steps through the trainer's loop; with ``split``, the data side's parts."""
    spent: dict = {}
    if split:
        dataset = trainer.train_loader.dataset
        dataset.data = Probe(dataset.data, spent, "read")
        dataset.transform = Probe(dataset.transform, spent, "host_stage")
        trainer.data.device_batch = Probe(trainer.data.device_batch, spent, "device_stage", device)
    result = trainer.train(steps=steps)
    row = {k: result[k] for k in ("num_steps", "train_seconds", "data_seconds", "compute_seconds")}
    if split:
        parts = dict(spent, loader_other=result["data_seconds"] - sum(spent.values()))
        parts["to_device"] = to_device_seconds(trainer, device) * result["num_steps"]  # part of the device stage
        row["split_seconds"] = parts
    return row


def validation_rounds(trainer, rounds: int) -> dict:
    """``rounds`` validations of the trainer's model: seconds per case each, and the shapes the network was given."""
    shapes: set = set()
    hook = trainer.model.register_forward_pre_hook(lambda module, args: shapes.add(tuple(args[0].shape)))
    per_case = []
    for _ in range(rounds):
        summary = trainer.validate()
        per_case.append(summary["val_seconds"] / max(summary["n_cases"], 1))
    hook.remove()
    return {"seconds_per_case": per_case, "window_shapes": sorted(shapes), "warmup_seconds": trainer.warmup_seconds}


def measure(spec: dict) -> dict:
    """Everything of one device, in this process: validation, the bare step, the settings in order, the bare step
    again; what is done so far is written to ``spec["raw"]`` after each part (a run cut short keeps it)."""
    import torch

    from fedseg.settings import profile

    settings = replace(profile(spec["profile"]), **spec["overrides"])
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    folder, cache, device, steps = spec["folder"], spec["cache"], spec["device"], spec["steps"]
    first = new_trainer(folder, cache, settings, device, 0, True)
    out = {"validation": validation_rounds(first, spec["val_rounds"]), "torch_threads": torch.get_num_threads()}
    out["compute"] = compute_step(first, steps, device)
    del first
    keep = functools.partial(write_json, spec["raw"])
    order = list(spec["settings"])
    out["rounds"] = []
    for setting in [s for r in range(spec["repeats"]) for s in (order if r % 2 == 0 else order[::-1])]:
        workers, thread = setting.split(":")
        trainer = new_trainer(folder, cache, settings, device, int(workers), thread == "on")
        trainer.train(steps=1)  # unmeasured: a new trainer's first step (memory, kernels' first use), not the loader's
        out["rounds"].append({"setting": setting, **loader_round(trainer, steps, device, setting == SPLIT_SETTING)})
        print(f"  {setting}: {out['rounds'][-1]['train_seconds']:.1f} s", file=sys.stderr, flush=True)
        del trainer
        keep(out)
    out["compute_after"] = compute_step(new_trainer(folder, cache, settings, device, 0, True), steps, device)
    if device == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    keep(out)
    return out


def bare_step(spec: dict) -> dict:
    """Only the bare compute step of these settings on this device (what bench.fets_scale compares with)."""
    import torch

    from fedseg.settings import profile

    settings = replace(profile(spec["profile"]), **spec["overrides"])
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    trainer = new_trainer(spec["folder"], spec["cache"], settings, spec["device"], 0, True)
    return compute_step(trainer, spec["steps"], spec["device"])


# -- the arithmetic (unit-tested) ------------------------------------------------------------------------------
def summarise(raw: dict, default: str = "0:on") -> dict:
    """Per setting: seconds per step, data share, step vs compute, the split; the default's data share; validation."""
    before_after = [raw[k]["seconds_per_step"] for k in ("compute", "compute_after") if k in raw]
    bare = statistics.median(before_after)
    by_setting: dict[str, list] = {}
    for row in raw["rounds"]:
        by_setting.setdefault(row["setting"], []).append(row)
    settings = []
    for name, rows in by_setting.items():
        steps = sum(r["num_steps"] for r in rows)
        train, data = sum(r["train_seconds"] for r in rows), sum(r["data_seconds"] for r in rows)
        entry = {
            "setting": name,
            "num_workers": int(name.split(":")[0]),
            "loader_thread": name.endswith(":on"),
            "steps": steps,
            "seconds_per_step": train / steps,
            "data_seconds_per_step": data / steps,
            "compute_seconds_per_step": sum(r["compute_seconds"] for r in rows) / steps,
            "data_share": data / train,
            "step_vs_compute": train / steps / bare,
        }
        splits = [r["split_seconds"] for r in rows if "split_seconds" in r]
        if splits:
            entry["split_seconds_per_step"] = {k: sum(s[k] for s in splits) / steps for k in splits[0]}
        settings.append(entry)
    val = raw["validation"]["seconds_per_case"]
    chosen = next((s for s in settings if s["setting"] == default), settings[0])
    return {
        "data_share": chosen["data_share"],
        "data_share_setting": chosen["setting"],
        "step_vs_compute": chosen["step_vs_compute"],
        "compute_seconds_per_step": bare,
        "compute_before_after": before_after,
        "settings": settings,
        "validation": {
            **raw["validation"],
            "first_vs_later": val[0] / statistics.median(val[1:]) if len(val) > 1 else None,
        },
        "peak_gpu_mib": raw.get("peak_gpu_mib"),
        "torch_threads": raw.get("torch_threads"),
    }


# -- the driver ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", default="fets2022")
    parser.add_argument("--steps", type=int, default=3, help="steps per setting and of the bare step")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="workers:thread (on/off)")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the settings, there and back")
    parser.add_argument("--val-rounds", type=int, default=3)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--distinct", type=int, default=4)
    parser.add_argument("--work", default=os.path.join("bench", ".work", "step_split"))
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script (not a result)")
    add_training_options(parser)  # --crop, --channels, --threads, --val-max-cases, ... over the profile's
    return parser.parse_args(argv)


def entry_name(args: argparse.Namespace) -> str:
    """The result entry: the device, and the profile when it is not fets2022 or a size was changed."""
    name = args.device if args.profile == "fets2022" else f"{args.device}/{args.profile}"
    if list(args.settings) != list(DEFAULT_SETTINGS):
        name += "/" + "+".join(args.settings)
    given = given_training_options(args)
    if "crop" in given or "channels" in given:
        crop, channels = given.get("crop"), given.get("channels")
        name += f"/crop{'x'.join(map(str, crop)) if crop else ''}" + (
            f"/ch{'-'.join(map(str, channels))}" if channels else ""
        )
    return name


def spec_for(args: argparse.Namespace, folder: str, cache: str) -> dict:
    overrides = {"val_max_cases": VAL_MAX_CASES, **given_training_options(args)}
    return {
        "profile": args.profile,
        "overrides": overrides,
        "folder": folder,
        "cache": cache,
        "device": args.device,
        "steps": args.steps,
        "settings": args.settings,
        "repeats": args.repeats,
        "val_rounds": args.val_rounds,
    }


def prepared_site(args: argparse.Namespace, work: str) -> str:
    """The site folder (made once under ``work``): full-size cases, or tiny ones with ``--smoke``."""
    if args.smoke:
        from fedseg.data_prep.fets2022 import prepare_sites
        from fedseg.data_prep.synthetic import Institution, SyntheticConfig, generate

        sites = os.path.join(work, "smoke_sites")
        if not os.path.isdir(os.path.join(sites, "site-1")):
            config = SyntheticConfig(shape=(32, 32, 24), institutions=[Institution(subjects=args.cases)])
            prepare_sites(generate(os.path.join(work, "smoke_data"), config), sites, partitions=[1])
        return os.path.join(sites, "site-1")
    from bench.site_scale import make_pool, make_site

    return make_site(work, make_pool(work, args.distinct), args.cases)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.smoke:
        args.crop, args.channels, args.steps, args.repeats, args.val_rounds = args.crop or [16] * 3, [4, 8], 2, 1, 2
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    folder = prepared_site(args, work)
    spec = spec_for(args, folder, os.path.join(work, "cache_smoke" if args.smoke else "cache"))
    print(f"{entry_name(args)}: settings {' '.join(args.settings)}, {args.steps} steps each ...", flush=True)
    started = time.time()
    spec["raw"] = os.path.join(work, f"raw_{entry_name(args).replace('/', '_')}.json")
    if os.path.exists(spec["raw"]):
        os.remove(spec["raw"])
    code = "import json, sys; from bench.step_split import measure; measure(json.loads(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], check=False)
    if not os.path.exists(spec["raw"]):
        raise SystemExit(f"the measuring process ended ({done.returncode}) before its first round")
    with open(spec["raw"], encoding="utf-8") as f:
        summary = summarise(json.load(f))
    recorded = {k: v for k, v in spec.items() if k not in LOCAL_PATHS}  # the settings, not this machine's folders
    summary.update(machine=machine(), wall_seconds=time.time() - started, spec=recorded, load_average=os.getloadavg())
    if done.returncode:  # cut short (killed): what it had measured, said so
        summary["incomplete"] = f"the measuring process ended with {done.returncode}"
    path = save_entry(RESULT_NAME, entry_name(args), summary, DEFINITIONS, work if args.smoke else None)
    print(markdown(summary))
    print(f"written {path}")


VAL_MAX_CASES = 2  # validation cases a round, unless --val-max-cases says otherwise
LOCAL_PATHS = ("folder", "cache", "raw")  # where this machine kept the site, cache and raw record

DEFINITIONS = {
    "data_share": "data seconds / training seconds of a round, at the trainer's default loader (0 workers, "
    "loader thread on): waiting for a batch and finishing its augmentation on the device",
    "step_vs_compute": "seconds per step of a round / the bare compute step (SiteTrainer.step on a batch held on "
    "the device), same process",
    "validation.first_vs_later": "first validation's seconds per case / the median of the later validations'",
}


def markdown(summary: dict) -> str:
    rows = []
    for s in summary["settings"]:
        split = s.get("split_seconds_per_step")
        rows.append(
            [
                f"{s['num_workers']} workers, thread {'on' if s['loader_thread'] else 'off'}",
                f"{s['seconds_per_step']:.3f}",
                f"{s['data_seconds_per_step']:.3f}",
                f"{s['compute_seconds_per_step']:.3f}",
                f"{100 * s['data_share']:.1f}%",
                f"{s['step_vs_compute']:.2f}",
                " / ".join(f"{1000 * split[k]:.0f}" for k in ("read", "host_stage", "loader_other", "device_stage"))
                if split
                else "-",
            ]
        )
    headers = ["loader", "s/step", "data s/step", "compute s/step", "data share", "step vs compute"]
    out = table(headers + ["read / host stage / loader / device stage (ms)"], rows)
    val = summary["validation"]
    ratio = val["first_vs_later"]
    return out + (
        f"\nbare compute step {summary['compute_seconds_per_step']:.3f} s; validation s/case "
        f"{', '.join(f'{v:.2f}' for v in val['seconds_per_case'])} (first vs later "
        f"{'-' if ratio is None else f'{ratio:.2f}'}), window shapes {val['window_shapes']}"
    )


if __name__ == "__main__":
    main()
