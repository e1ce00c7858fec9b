"""Shared helpers of the benchmark scripts: machine description, result files, markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from fedseg.atomic import write_json

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def recorded_command(argv: list[str]) -> str:
    """The command that reproduces a result, without ``--work DIR``: a scratch folder changes no figure."""
    args, skip = [], False
    for arg in argv[1:]:
        if skip or arg == "--work" or arg.startswith("--work="):
            skip = arg == "--work"
            continue
        args.append(arg)
    return " ".join([".venv/bin/python -m bench." + os.path.splitext(os.path.basename(argv[0]))[0], *args])


def load_result(name: str) -> dict:
    """The result file ``name`` as an earlier run left it ({} when there is none): what a resumed run keeps."""
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_result(name: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    payload = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": recorded_command(sys.argv),
        **payload,
    }
    write_json(path, payload)
    return path


def last_json_line(output: str) -> dict:
    """The JSON object a child process printed last (libraries may print before it)."""
    return json.loads(output.strip().splitlines()[-1])


def run_python(code: str, *args: str) -> dict:
    """Python code in a fresh process (its own memory counters, its own torch threads); the JSON it printed last."""
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return last_json_line(out.stdout)


def run_measured(command: list[str]) -> tuple[float, float]:
    """Run a command in a fresh process; (wall seconds, peak RSS in MiB of its largest process)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.measure", "--", *command], check=True, capture_output=True, text=True
    ).stdout
    result = last_json_line(out)
    return result["wall_seconds"], result["peak_rss_mib"]


def save_entry(name: str, key: str, entry: dict, definitions: dict, smoke_dir: str | None = None) -> str:
    """``entry`` as ``key`` in result file ``name`` beside the entries already there; the path written.

    ``smoke_dir``: a smoke run's file goes there instead (it checks a script, it measures nothing)."""
    if smoke_dir is None:
        entries = load_result(name).get("entries", {})
        return write_result(name, {"entries": {**entries, key: entry}, "definitions": definitions})
    path = os.path.join(smoke_dir, f"{name}_smoke.json")
    entries = json.load(open(path, encoding="utf-8")).get("entries", {}) if os.path.exists(path) else {}
    write_json(path, {"entries": {**entries, key: entry}, "definitions": definitions})
    return path


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The site trainer's training options, as ``fedseg.settings`` defines them (each ``None`` unless given)."""
    from fedseg.settings import add_training_arguments

    add_training_arguments(parser.add_argument_group("training settings over the profile's"), None, dashes=True)


def given_training_options(args: argparse.Namespace) -> dict:
    """{setting: value} of the training options given on the command line (lists as tuples)."""
    from fedseg.settings import PROFILES, settings_from_arguments

    values = settings_from_arguments(args, PROFILES["demo"])
    return {name: value for name, value in values.items() if getattr(args, name, None) is not None}


def json_ready(settings: dict) -> dict:
    """Tuples as lists: settings as they read back from a result file, so that a resumed run compares equal."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def institutions(rows) -> list:
    """Synthetic institutions from (subjects, intensity scale, bias, noise, tumour radius in mm) rows."""
    from fedseg.data_prep.synthetic import Institution

    return [
        Institution(subjects=n, intensity_scale=s, bias_strength=b, noise=z, tumour_radius_mm=r)
        for n, s, b, z, r in rows
    ]


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
