"""What a finished run left behind, found and read the same way for simulator, POC and provisioned runs.

A run folder is any folder that holds, somewhere below it, the server's ``round_metrics.jsonl`` (written by
``fedseg.controller``); next to it FLARE leaves the global model and, with cross-site evaluation,
``cross_site_val/cross_val_results.json``. ``run.json`` at the top records how the run was started.

A run that continued a stopped one (``resume_job``) holds that run's round records too, copied by the server
into ``resumed_from/<job id>/`` beside its own (and, below that, those of any run that one continued): the
rounds are the earlier parts' followed by its own, each earlier record marked with its job (``resumed_from``).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

from fedseg.checkpoint import RESUMED_FROM_DIR, part_job
from fedseg.controller import REFERENCE_BUFFER_FILE, ROUND_METRICS_FILE
from fedseg.jobs.recipes import RUN_INFO_FILE

GLOBAL_MODEL_FILE = "FL_global_model.pt"
CROSS_SITE_FILE = os.path.join("cross_site_val", "cross_val_results.json")
SERVER_MODEL_KEY = "SRV_FL_global_model.pt"


class RunArtifactsError(RuntimeError):
    """A run folder lacks what a report needs."""


@dataclass
class RunArtifacts:
    folder: str
    server_dir: str
    rounds: list[dict]
    run_info: dict = field(default_factory=dict)
    cross_site: dict | None = None
    global_model: str | None = None
    reference_buffer: str | None = None

    @property
    def algorithm(self) -> str:
        return self.run_info.get("settings", {}).get("algorithm") or (
            self.rounds[-1].get("algorithm") if self.rounds else "?"
        )

    @property
    def sites(self) -> list[str]:
        seen: dict[str, None] = {}
        for record in self.rounds:
            for site in record.get("sites", {}):
                seen.setdefault(site, None)
        return sorted(seen)


def _find_one(root: str, name: str) -> str | None:
    """The shortest path to ``name`` below ``root``, outside the copies of earlier runs (``resumed_from/``)."""
    hits = sorted(glob.glob(os.path.join(root, "**", name), recursive=True), key=len)
    own = [h for h in hits if RESUMED_FROM_DIR not in os.path.relpath(h, root).split(os.sep)[:-1]]
    return own[0] if own else None


def earlier_rounds(server_dir: str, first_round: int) -> list[dict]:
    """The round records of the runs this one continued, before ``first_round``, each marked with its job id.

    The nearest part first (``resumed_from/<id>/``, then what that one continued, below it): each part gives
    the rounds before the first one already taken, so a round is never counted twice.
    """
    pattern = os.path.join(server_dir, RESUMED_FROM_DIR, "**", ROUND_METRICS_FILE)
    taken: list[dict] = []
    for path in sorted(glob.glob(pattern, recursive=True), key=len):
        job = part_job(os.path.relpath(path, server_dir))
        if job is None:  # e.g. FLARE's own metrics/round_metrics.jsonl of that run: another format
            continue
        records = [{**r, "resumed_from": job} for r in read_round_metrics(path) if r["round"] < first_round]
        if records:
            taken, first_round = records + taken, records[0]["round"]
    return taken


def read_round_metrics(path: str) -> list[dict]:
    """The round records, in round order; a last line cut off by a crash is skipped, others must parse."""
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise RunArtifactsError(f"{path}:{number}: not a JSON record ({exc.msg})") from exc
    return sorted(records, key=lambda r: r["round"])


def load_run(folder: str) -> RunArtifacts:
    """Collect the artifacts of the run under ``folder``."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise RunArtifactsError(f"{folder}: no such run folder")
    metrics_path = _find_one(folder, ROUND_METRICS_FILE)
    if metrics_path is None:
        raise RunArtifactsError(f"{folder}: no {ROUND_METRICS_FILE} below it; did the server run any round?")
    server_dir = os.path.dirname(metrics_path)
    rounds = read_round_metrics(metrics_path)
    if not rounds:
        raise RunArtifactsError(f"{metrics_path}: holds no completed round")
    rounds = earlier_rounds(server_dir, rounds[0]["round"]) + rounds
    info_path = os.path.join(folder, RUN_INFO_FILE)
    run_info = {}
    if os.path.isfile(info_path):
        with open(info_path, encoding="utf-8") as f:
            run_info = json.load(f)
    cross_site = None
    cross_path = os.path.join(server_dir, CROSS_SITE_FILE)
    if os.path.isfile(cross_path):
        with open(cross_path, encoding="utf-8") as f:
            cross_site = json.load(f)
    buffer_path = os.path.join(server_dir, REFERENCE_BUFFER_FILE)
    return RunArtifacts(
        folder=folder,
        server_dir=server_dir,
        rounds=rounds,
        run_info=run_info,
        cross_site=cross_site,
        global_model=_find_one(server_dir, GLOBAL_MODEL_FILE),
        reference_buffer=buffer_path if os.path.isfile(buffer_path) else None,
    )
