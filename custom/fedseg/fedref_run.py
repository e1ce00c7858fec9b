"""FedRef's run on disk: what a round leaves for a restart and for a reader, and how a stopped run continues.

Why apart from the controller: these are file and folder rules (the server's checkpoint store, FLARE's job
store, atomic writes, weights-only loading) that hold whatever the round loop does. Every refusal is a
``JobRefused`` naming the job's setting, raised when the workflow starts, before any model is sent.
- ``save_reference_buffer`` / ``save_step_record``: after each round, the buffer a restart resumes from and
  the MAP step's inputs (anyone can recompute the last global model from the closed form);
- ``stopped_run`` / ``resume_files`` / ``read_reference_buffer`` / ``continued_rounds``: a job naming a
  stopped run (``resume_job``) continues it from the server's own store, never from a file the job names;
- ``keep_earlier_records``: the stopped run's round records go beside the new run's, for the report.
"""

from __future__ import annotations

import os
import shutil

from fedseg.atomic import atomic_path
from fedseg.checkpoint import (
    REFERENCE_BUFFER_FILE,
    RESUMED_FROM_DIR,
    ROUND_METRICS_FILE,
    find_resume_files,
    load_file,
    part_job,
    round_records,
    to_arrays,
    to_tensors,
    unpack_stored_run,
)
from fedseg.fedref import FedRefUpdater, ReferenceBuffer, is_float_tensor
from fedseg.server_config import JobRefused, ServerConfig, job_store

FEDREF_STEP_FILE = "fedref_step.pt"  # the inputs of the last MAP step, to check it from the run's artifacts


# -- after each round --------------------------------------------------------------------------------------------
def save_reference_buffer(run_dir: str, updater: FedRefUpdater, round_number: int) -> None:
    """Write the buffer atomically next to the run's checkpoints (a restart can resume from it)."""
    import torch

    state = updater.buffer.state()
    state["round"] = round_number
    state["velocity"] = updater.velocity
    with atomic_path(os.path.join(run_dir, REFERENCE_BUFFER_FILE)) as tmp:
        torch.save(to_tensors(state), tmp)


def save_step_record(run_dir: str, settings: dict, averaged: dict, previous_global: dict, buffered: list) -> None:
    """Write this round's MAP step inputs (atomically, replacing the last round's): with the saved global
    model they show that the step is the closed form of ``fedseg.fedref`` for this variant."""
    import torch

    def floats(params: dict) -> dict:
        return {k: v for k, v in params.items() if is_float_tensor(v)}

    record = {
        **settings,
        "averaged": floats(averaged),
        "previous_global": floats(previous_global),
        "buffer": buffered,
    }
    with atomic_path(os.path.join(run_dir, FEDREF_STEP_FILE)) as tmp:
        torch.save(to_tensors(record), tmp)


# -- continuing a stopped run ------------------------------------------------------------------------------------
def stopped_run(workspace, config: ServerConfig, resume_job: str, job_id: str, run_dir: str) -> tuple[str, str]:
    """(the store, the stopped run's folder): a run folder of the server's checkpoint store, or a finished job's
    checkpoints unpacked from FLARE's job store into this run's folder."""
    store = os.path.realpath(config.store(workspace.get_root_dir()))
    folder = os.path.join(store, resume_job)
    real = os.path.realpath(folder)
    if resume_job == job_id or os.path.islink(folder) or os.path.dirname(real) != store:
        raise JobRefused(f"resume_job = {resume_job!r}: not a run folder of the server's checkpoint store")
    if not os.path.isdir(real):
        real = unpack_finished_run(workspace, resume_job, os.path.join(run_dir, RESUMED_FROM_DIR, resume_job))
    return store, real


def unpack_finished_run(workspace, resume_job: str, destination: str) -> str:
    """A finished job's checkpoints and round records, from the workspace FLARE saved in its job store (the run
    folder is gone), unpacked into ``destination``; JobRefused when the store holds no such job."""
    from nvflare.app_common.storages.filesystem_storage import FilesystemStorage

    root = job_store(workspace.get_site_config_dir())
    try:
        found = root and os.path.isdir(root)
        saved = FilesystemStorage(root_dir=root).get_data(resume_job, "workspace") if found else None
    except Exception:  # FLARE's StorageException: no such job, or it left no workspace
        saved = None
    if saved is None:
        raise JobRefused(f"resume_job = {resume_job!r}: no such run in the server's checkpoint store or job store")
    return unpack_stored_run(saved, destination)


def resume_files(folder: str, resume_job: str) -> tuple[str, str]:
    """(global model, reference buffer) of the stopped run: its newest buffer and the model saved beside it."""
    try:
        return find_resume_files(folder)
    except FileNotFoundError:
        raise JobRefused(
            f"resume_job = {resume_job!r}: that run left no {REFERENCE_BUFFER_FILE} with a global model"
        ) from None


def read_reference_buffer(path: str, buffer_size: int, resume_job: str) -> tuple[ReferenceBuffer, object, int]:
    """(buffer, velocity, round) of a saved buffer, weights only; its capacity must be this job's p."""
    state = load_file(path)
    if not isinstance(state, dict) or "capacity" not in state or "models" not in state:
        raise JobRefused(f"{os.path.basename(path)} of run {resume_job}: not a FedRef reference buffer")
    state = to_arrays(state)
    buffer = ReferenceBuffer.from_state(state)
    if buffer.capacity != buffer_size:
        raise JobRefused(f"buffer_size = {buffer_size!r}: run {resume_job} saved a buffer of size {buffer.capacity}")
    return buffer, state.get("velocity"), int(state.get("round", -1))


def continued_rounds(
    resume_job: str, resumed_round: int, start_round: int, num_rounds: int, planned_rounds: int | None
) -> tuple[int, int]:
    """(start round, rounds to run) of the continuation: the round after the buffer's, and the rounds still to do
    of ``planned_rounds`` (or ``num_rounds`` more without it)."""
    next_round = resumed_round + 1
    if start_round not in (0, next_round):
        raise JobRefused(f"start_round = {start_round!r}: run {resume_job} continues at round {next_round}")
    if planned_rounds is not None:
        if planned_rounds <= next_round:
            raise JobRefused(
                f"planned_rounds = {planned_rounds!r}: run {resume_job} already did {next_round} of "
                f"the {planned_rounds} planned rounds"
            )
        num_rounds = planned_rounds - next_round
    return next_round, num_rounds


def keep_earlier_records(stopped: str, target: str, resume_job: str, warn) -> None:
    """The stopped run's round records beside this run's, ``resumed_from/<job id>/round_metrics.jsonl`` (its
    own file, the shortest path, as the report finds it) with those of the runs it continued in turn, so that
    this run's report covers every part. A run unpacked from the job store has them there already."""
    found = round_records(stopped)
    if not found or os.path.realpath(stopped) == os.path.realpath(target):
        return
    own = os.path.join(target, ROUND_METRICS_FILE)
    copies = {}
    for path in found:
        relative = os.path.relpath(path, stopped)
        if part_job(relative):  # a part before it: .../resumed_from/<id>/round_metrics.jsonl
            copies[path] = os.path.join(target, relative)
        elif own not in copies.values() and RESUMED_FROM_DIR not in relative.split(os.sep):
            copies[path] = own  # its own: the shortest path outside resumed_from/
    try:
        for source, destination in copies.items():
            with atomic_path(destination) as tmp:
                shutil.copyfile(source, tmp)
    except OSError as exc:  # the records are for the report: the run goes on without them
        warn(f"round records of run {resume_job} not copied: {exc}")
