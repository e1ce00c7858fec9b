"""``fedseg resume <job id>``: continue a FedRef job whose server stopped mid-run, from the researcher's admin kit.

A provisioned server killed mid-job and started again marks the job FINISHED:ABANDONED and keeps its run
folder (global model, reference buffer, round records) where its checkpoint store finds it. The researcher
cannot see that store and need not: this command downloads the stopped job through the Flare API, writes the
same job naming it (``resume_job``) with its total rounds (``planned_rounds``), and submits that under a new
name. The server goes on at the round after the last one it saved, runs only the rounds still to do, and
copies the stopped run's round records beside the new run's, so that the new run's report covers both parts.

What ``download_job_result`` leaves (NVFlare 2.9, ``job_cmds._get_default_job_components``): a folder
``<job id>/`` holding ``meta.json`` (the server's meta of the job: status, ``job_folder_name``, ...), ``job/``
(the job's definition as it was submitted, ``job.zip`` unzipped: ``job/<job folder>/meta.json`` and
``job/<job folder>/app/config/...``, with FLARE's signature files) and, where the job left one, ``workspace/``
(the server's run folder). Everything this command writes is temporary and removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable

from fedseg.atomic import read_json_object
from fedseg.policy import SIGNATURE_FILES
from fedseg.server_config import PLAIN_NAME, integer, plain_name

FEDREF_CONTROLLER = "fedseg.controller.FedRefController"
SERVER_CONFIG_FILE = "config_fed_server.json"
JOB_META_FILE = "meta.json"
RESUMED_SUFFIX = "_resumed"
CONNECT_SECONDS = 30.0
POLL_SECONDS = 5.0


class ResumeRefused(ValueError):
    """The job cannot be continued; the message is one line: the reason (the caller names the job)."""


def _read_json(path: str) -> dict:
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise ResumeRefused(f"{os.path.basename(path)} of the downloaded job is {exc}") from None


def job_definition(download: str) -> str:
    """The job folder inside a ``download_job_result`` folder: ``job/<job folder>/`` (the one the server's meta
    names, else the one holding a ``meta.json``)."""
    root = os.path.join(download, "job")
    server_meta = os.path.join(download, JOB_META_FILE)
    named = _read_json(server_meta).get("job_folder_name") if os.path.isfile(server_meta) else None
    candidates = [os.path.join(root, os.path.basename(named))] if isinstance(named, str) and named else []
    if os.path.isdir(root):
        candidates += [os.path.join(root, d) for d in sorted(os.listdir(root))] + [root]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, JOB_META_FILE)) and not os.path.islink(folder):
            return folder
    raise ResumeRefused(f"the download holds no job definition (job/<job folder>/{JOB_META_FILE})")


def _deployed_to(entries) -> set[str]:
    """The participants of one ``deploy_map`` entry: names, or ``{"sites": [...]}`` objects."""
    names = set()
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, str):
            names.add(entry.lower())
        elif isinstance(entry, dict):
            names |= {s.lower() for s in entry.get("sites", []) if isinstance(s, str)}
    return names


def server_app(job_folder: str, meta: dict) -> str:
    """The folder of the app the job deploys to the server (``deploy_map``: ``server`` or ``@ALL``)."""
    deploy_map = meta.get("deploy_map")
    if not isinstance(deploy_map, dict):
        raise ResumeRefused(f"its {JOB_META_FILE} has no deploy_map")
    for app, entries in deploy_map.items():
        if _deployed_to(entries) & {"server", "@all"} and PLAIN_NAME.match(str(app)):
            return os.path.join(job_folder, app)
    raise ResumeRefused(f"its {JOB_META_FILE} deploys no app to the server")


def fedref_controller(config: dict) -> dict:
    """The FedRefController workflow of a server config (its ``args`` edited in place by the caller)."""
    workflows = [w for w in config.get("workflows", []) if isinstance(w, dict)]
    found = [w for w in workflows if w.get("path") == FEDREF_CONTROLLER]
    if len(found) != 1:
        paths = ", ".join(str(w.get("path")) for w in workflows) or "no workflow"
        raise ResumeRefused(f"not a FedRef job (its server runs {paths}); only a FedRef run can be continued")
    if not isinstance(found[0].setdefault("args", {}), dict):
        raise ResumeRefused("its FedRefController's args are not a JSON object")
    return found[0]


def _default_rounds() -> int:
    """FLARE's num_rounds where a job leaves it out (jobs exported before it was always written)."""
    import inspect

    from nvflare.app_common.workflows.base_fedavg import BaseFedAvg

    return inspect.signature(BaseFedAvg.__init__).parameters["num_rounds"].default


def planned_total(args: dict) -> int:
    """The rounds the stopped job was to reach in all: its ``planned_rounds`` (a continuation this command wrote),
    else ``start_round`` + ``num_rounds`` (a job from round 0, or a continuation that named its start round)."""
    if args.get("planned_rounds") is not None:
        return integer("planned_rounds", args["planned_rounds"], 1, None)
    start = integer("start_round", args.get("start_round", 0), 0, None)
    if args.get("resume_job") is not None and not start:
        raise ResumeRefused(
            f"it continued run {args['resume_job']} by num_rounds more rounds and names no planned_rounds, so its "
            "total is not in its definition; export its continuation with `python -m fedseg.jobs.export "
            "--algorithms fedref --resume-job <job id> --planned-rounds N`"
        )
    return start + integer("num_rounds", args.get("num_rounds", _default_rounds()), 1, None)


def resumed_name(name: str) -> str:
    """``<name>_resumed`` (a name that already ends so is kept), a plain name of at most 128 characters."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name or "").lstrip("_.-") or "fedseg_fedref"
    if not name.endswith(RESUMED_SUFFIX):
        name = name[: 128 - len(RESUMED_SUFFIX)] + RESUMED_SUFFIX
    return name[:128]


def write_resumed_job(job_folder: str, job_id: str, out_dir: str) -> tuple[str, int]:
    """The stopped job's definition as a new job folder under ``out_dir`` that continues it: its FedRefController
    with ``resume_job`` = ``job_id`` and ``planned_rounds`` = the stopped job's total, no ``start_round`` (the
    server takes the round from the stopped run), and a new name. Returns (folder, planned rounds)."""
    plain_name("job id", job_id)
    meta = _read_json(os.path.join(job_folder, JOB_META_FILE))
    config_path = os.path.join(server_app(job_folder, meta), "config", SERVER_CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ResumeRefused(f"its server app holds no config/{SERVER_CONFIG_FILE}")
    config = _read_json(config_path)
    controller = fedref_controller(config)
    args = controller["args"]
    planned = planned_total(args)
    args.pop("start_round", None)
    controller["args"] = dict(sorted({**args, "resume_job": job_id, "planned_rounds": planned}.items()))
    name = resumed_name(str(meta.get("name") or os.path.basename(job_folder)))
    meta["name"] = name
    meta.pop("job_id", None)  # a new job: the server gives it an id
    target = os.path.join(out_dir, name)
    # FLARE signs the folder again when it is submitted: the stopped job's signatures would no longer match
    shutil.copytree(job_folder, target, symlinks=True, ignore=shutil.ignore_patterns(*SIGNATURE_FILES))
    written = {JOB_META_FILE: meta, os.path.relpath(config_path, job_folder): config}
    for relative, content in written.items():
        with open(os.path.join(target, relative), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=4)
            f.write("\n")
    return target, planned


def check_stopped(meta: dict) -> None:
    """Only a job that ended before its rounds were done can be continued."""
    status = str(meta.get("status") or "")
    if not status.startswith("FINISHED"):
        raise ResumeRefused(
            f"it is {status or 'not finished'}: only a stopped job can be continued (wait for it, or abort_job it)"
        )
    if status == "FINISHED:COMPLETED":
        raise ResumeRefused("it completed (FINISHED:COMPLETED): no round is left to run")


def _quiet(call: Callable, *args, **kwargs):
    """A Flare API call without the lines the session prints on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        return call(*args, **kwargs)


def submit_continuation(session, job_id: str, work: str) -> tuple[str, str, int]:
    """Download the stopped job, write its continuation under ``work`` and submit it: (new job id, name, planned)."""
    check_stopped(_quiet(session.get_job_meta, job_id))
    download = _quiet(session.download_job_result, job_id, destination=os.path.join(work, "download"))
    if not download or not os.path.isdir(download):
        raise ResumeRefused("the server sent no job definition")
    folder, planned = write_resumed_job(job_definition(download), job_id, os.path.join(work, "job"))
    return _quiet(session.submit_job, folder), os.path.basename(folder), planned


def wait_for(session, job_id: str, timeout: float) -> str:
    """The job's final status, or ``still <status>`` when ``timeout`` (seconds, 0: none) ran out first."""
    _, meta = _quiet(session.monitor_job_and_return_job_meta, job_id, timeout=timeout, poll_interval=POLL_SECONDS)
    if meta is None:
        return f"still {_quiet(session.get_job_meta, job_id).get('status')} after {timeout:.0f} s"
    return str(meta.get("status"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def connect(user: str, startup_kit: str):
    """A secure Flare API session from an admin's startup kit (``<kit>/startup/fed_admin.json``)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    if not os.path.isfile(os.path.join(startup_kit, "startup", "fed_admin.json")):
        raise ResumeRefused(f"{startup_kit}: not an admin startup kit (no startup/fed_admin.json)")
    return _quiet(new_secure_session, user, startup_kit, timeout=CONNECT_SECONDS)


def run(
    job_id: str,
    startup_kit: str,
    user: str | None = None,
    wait: bool = False,
    timeout: float = 0.0,
    session_factory: Callable = connect,
) -> int:
    """``fedseg resume``: submit the continuation of ``job_id``; with ``wait``, 0 only if it ends FINISHED:COMPLETED.

    Every failure is one line on stderr, ``fedseg resume: <job id>: <reason>``, and exit status 1.
    """
    startup_kit = os.path.abspath(startup_kit)
    user = user or os.path.basename(os.path.normpath(startup_kit))
    session = None
    try:
        plain_name("job id", job_id)
        session = session_factory(user, startup_kit)
        with tempfile.TemporaryDirectory(prefix="fedseg_resume_") as work:
            new_id, name, planned = submit_continuation(session, job_id, work)
        print(f"submitted job {new_id} ({name}): continues {job_id} up to {planned} rounds in all", flush=True)
        if not wait:
            return 0
        status = wait_for(session, new_id, timeout)
        print(f"job {new_id}: {status}", flush=True)
        return 0 if status == "FINISHED:COMPLETED" else 1
    except Exception as exc:  # FLARE's own kinds (no such job, no connection, not authorized) and ours alike
        print(f"fedseg resume: {job_id}: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if session is not None:
            with contextlib.suppress(Exception):
                _quiet(session.close)
