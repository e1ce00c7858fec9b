"""`fedseg resume`: a downloaded stopped job in, the job that continues it out (no federation, no FLARE session).

The downloads are laid out as NVFlare 2.9's ``download_job_result`` leaves them (see fedseg.app.resume): the
server's ``meta.json``, the job as submitted under ``job/<job folder>/`` (signed), and ``workspace/``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
from helpers.server_fakes import start, stopped_run

from fedseg.app.cli import main
from fedseg.app.resume import (
    ResumeRefused,
    check_stopped,
    job_definition,
    planned_total,
    resumed_name,
    run,
    write_resumed_job,
)
from fedseg.controller import FedRefController
from fedseg.jobs.export import export_job
from fedseg.jobs.recipes import JobSettings
from fedseg.policy import SIGNATURE_FILES, ConfigOnlyJobValidator

JOB_ID = "3f2c-ab"
SERVER_CONFIG = os.path.join("app", "config", "config_fed_server.json")
CLIENT_CONFIG = os.path.join("app", "config", "config_fed_client.json")


def settings(**overrides) -> JobSettings:
    return JobSettings(**{"algorithm": "fedref", "sites": ["site-1", "site-2"], "num_rounds": 5, **overrides})


def downloaded(root, job: JobSettings, job_id: str = JOB_ID, status: str = "FINISHED:ABANDONED") -> str:
    """What ``download_job_result`` leaves for ``job``: ``<root>/<job id>/`` with meta.json, job/<folder>/, workspace/."""
    exported = export_job(job, os.path.join(root, "exported"))
    download = os.path.join(root, "download", job_id)
    shutil.copytree(exported, os.path.join(download, "job", "fedref_job"))
    for folder, _, _ in os.walk(os.path.join(download, "job", "fedref_job")):
        for name in SIGNATURE_FILES:  # FLARE signed the folder when it was submitted
            with open(os.path.join(folder, name), "w") as f:
                f.write("{}")
    meta = {"job_id": job_id, "name": job.job_name, "status": status, "job_folder_name": "fedref_job"}
    with open(os.path.join(download, "meta.json"), "w") as f:
        json.dump(meta, f)
    os.makedirs(os.path.join(download, "workspace"))
    return download


def controller_args(job_folder: str) -> dict:
    with open(os.path.join(job_folder, SERVER_CONFIG)) as f:
        (controller,) = [w for w in json.load(f)["workflows"] if w["id"] == "controller"]
    return controller["args"]


def edit_controller(download: str, edit) -> None:
    path = os.path.join(download, "job", "fedref_job", SERVER_CONFIG)
    with open(path) as f:
        config = json.load(f)
    edit(next(w for w in config["workflows"] if w["id"] == "controller")["args"])
    with open(path, "w") as f:
        json.dump(config, f)


def test_a_stopped_job_becomes_the_same_job_naming_it_and_its_total_rounds(tmp_path):
    download = downloaded(tmp_path, settings())
    stopped = job_definition(download)
    folder, planned = write_resumed_job(stopped, JOB_ID, str(tmp_path / "out"))

    assert planned == 5 and os.path.basename(folder) == "fedseg_fedref_resumed"
    before, after = controller_args(stopped), controller_args(folder)
    assert after == {**before, "resume_job": JOB_ID, "planned_rounds": 5}
    assert "start_round" not in after
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    assert meta["name"] == "fedseg_fedref_resumed" and meta["deploy_map"] == {"app": ["@ALL"]}
    with open(os.path.join(folder, CLIENT_CONFIG)) as f, open(os.path.join(stopped, CLIENT_CONFIG)) as g:
        assert f.read() == g.read()  # the sites' part is the same job
    assert not [n for _, _, files in os.walk(folder) for n in files if n in SIGNATURE_FILES]  # FLARE signs it anew
    assert ConfigOnlyJobValidator().validate(os.path.join(folder, "app")) == ("", {})


def test_flare_accepts_the_continuation_as_a_job_definition(tmp_path):
    from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes
    from nvflare.private.fed.server.job_meta_validator import JobMetaValidator

    folder, _ = write_resumed_job(job_definition(downloaded(tmp_path, settings())), JOB_ID, str(tmp_path / "out"))
    name = os.path.basename(folder)
    valid, error, meta = JobMetaValidator().validate(name, zip_directory_to_bytes(str(tmp_path / "out"), name))
    assert (valid, error, meta["name"]) == (True, "", name)


def test_the_server_runs_the_continuation_up_to_the_planned_rounds(tmp_path):
    folder, planned = write_resumed_job(
        job_definition(downloaded(tmp_path, settings(num_rounds=6))), JOB_ID, str(tmp_path / "out")
    )
    stopped_run(tmp_path / "server", job=JOB_ID, capacity=3, round_number=3)  # killed after round 3 of 6
    controller = start(FedRefController(**controller_args(folder)), tmp_path / "server")
    assert (planned, controller.start_round, controller.num_rounds) == (6, 4, 2)  # rounds 4 and 5


def test_a_continuation_keeps_the_runs_planned_rounds_and_its_name(tmp_path):
    first = settings(name="brats_resumed", resume_job="first-job", planned_rounds=8, num_rounds=3)
    folder, planned = write_resumed_job(job_definition(downloaded(tmp_path, first)), JOB_ID, str(tmp_path / "out"))
    args = controller_args(folder)
    assert planned == 8 and (args["resume_job"], args["planned_rounds"]) == (JOB_ID, 8)
    assert os.path.basename(folder) == "brats_resumed"  # not brats_resumed_resumed


@pytest.mark.parametrize(
    "args, total",
    [
        ({"num_rounds": 5}, 5),
        ({"num_rounds": 5, "start_round": 0}, 5),
        ({"resume_job": "a", "start_round": 3, "num_rounds": 2}, 5),  # a continuation that named its start
        ({"resume_job": "a", "planned_rounds": 9, "num_rounds": 2}, 9),
        ({}, 5),  # num_rounds left out: FLARE's default
    ],
)
def test_the_planned_rounds_of_a_stopped_job(args, total):
    assert planned_total(args) == total


def test_a_start_round_is_left_to_the_server(tmp_path):
    download = downloaded(tmp_path, settings(resume_job="first-job"))
    edit_controller(download, lambda args: args.update(start_round=3, num_rounds=2))
    folder, planned = write_resumed_job(job_definition(download), JOB_ID, str(tmp_path / "out"))
    assert planned == 5 and "start_round" not in controller_args(folder)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            {"resume_job": "first-job", "num_rounds": 3},
            r"^it continued run first-job by num_rounds more rounds and names no planned_rounds, so its total is not "
            r"in its definition; export its continuation with .*--planned-rounds N`$",
        ),
        ({"num_rounds": "5"}, r"^num_rounds = '5': must be an integer$"),
        ({"resume_job": "a", "planned_rounds": 0}, r"^planned_rounds = 0: must be in \[1, inf\]$"),
    ],
)
def test_rounds_that_give_no_total_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        planned_total(args)


def test_only_a_fedref_job_is_continued(tmp_path):
    download = downloaded(tmp_path, settings(algorithm="fedavg"))
    with pytest.raises(ResumeRefused, match=r"^not a FedRef job \(its server runs fedseg.controller.RecordingFedAvg"):
        write_resumed_job(job_definition(download), JOB_ID, str(tmp_path / "out"))


def test_a_download_without_a_job_definition_or_a_server_app_is_refused(tmp_path):
    os.makedirs(tmp_path / "empty" / "workspace")
    with pytest.raises(ResumeRefused, match=r"the download holds no job definition \(job/<job folder>/meta.json\)"):
        job_definition(str(tmp_path / "empty"))
    download = downloaded(tmp_path, settings())
    path = os.path.join(download, "job", "fedref_job", "meta.json")
    with open(path) as f:
        meta = json.load(f)
    with open(path, "w") as f:
        json.dump({**meta, "deploy_map": {"app": ["site-1", "site-2"]}}, f)
    with pytest.raises(ResumeRefused, match="^its meta.json deploys no app to the server$"):
        write_resumed_job(job_definition(download), JOB_ID, str(tmp_path / "out"))


@pytest.mark.parametrize("status", ["SUBMITTED", "APPROVED", "DISPATCHED", "RUNNING"])
def test_a_job_still_running_is_refused(status):
    with pytest.raises(ResumeRefused, match=rf"^it is {status}: only a stopped job can be continued"):
        check_stopped({"status": status})


def test_a_completed_job_is_refused_and_a_stopped_one_passes():
    with pytest.raises(ResumeRefused, match=r"^it completed \(FINISHED:COMPLETED\): no round is left to run$"):
        check_stopped({"status": "FINISHED:COMPLETED"})
    for status in ("FINISHED:ABANDONED", "FINISHED:ABORTED", "FINISHED:EXECUTION_EXCEPTION"):
        check_stopped({"status": status})


@pytest.mark.parametrize("name, resumed", [("fedseg_fedref", "fedseg_fedref_resumed"), ("a b/c", "a_b_c_resumed")])
def test_the_new_name_is_a_plain_name(name, resumed):
    assert resumed_name(name) == resumed and len(resumed_name("x" * 200)) == 128


class FakeSession:
    """The Flare API calls `fedseg resume` makes, against a downloaded job."""

    def __init__(self, tmp_path, job: JobSettings, status="FINISHED:ABANDONED", final="FINISHED:COMPLETED"):
        self.source = downloaded(tmp_path / "server_side", job, status=status)
        self.status, self.final = status, final
        self.submitted: dict = {}
        self.closed = False

    def get_job_meta(self, job_id):
        if job_id != JOB_ID and job_id != "new-job":
            raise LookupError(f"no such job: {job_id}")
        return {"status": self.status if job_id == JOB_ID else "RUNNING"}

    def download_job_result(self, job_id, destination):
        target = os.path.join(destination, job_id)
        shutil.copytree(self.source, target)
        self.download = target
        return target

    def submit_job(self, folder):
        self.submitted = {"folder": folder, "args": controller_args(folder), "name": os.path.basename(folder)}
        return "new-job"

    def monitor_job_and_return_job_meta(self, job_id, timeout, poll_interval):
        return (0, {"status": self.final}) if self.final else (1, None)

    def close(self):
        self.closed = True


def fake_factory(session, seen: list):
    def factory(user, kit):
        seen.append((user, kit))
        return session

    return factory


def test_resume_submits_the_continuation_and_leaves_nothing_behind(tmp_path, capsys):
    session, seen = FakeSession(tmp_path, settings()), []
    kit = str(tmp_path / "prod_00" / "researcher@fedseg.org")
    assert run(JOB_ID, kit, session_factory=fake_factory(session, seen)) == 0
    assert seen == [("researcher@fedseg.org", kit)]  # the user is the kit folder's name
    assert session.submitted["name"] == "fedseg_fedref_resumed"
    assert (session.submitted["args"]["resume_job"], session.submitted["args"]["planned_rounds"]) == (JOB_ID, 5)
    assert not os.path.exists(session.submitted["folder"]) and not os.path.exists(session.download)
    out = capsys.readouterr().out.splitlines()
    assert out == [f"submitted job new-job (fedseg_fedref_resumed): continues {JOB_ID} up to 5 rounds in all"]
    assert session.closed


@pytest.mark.parametrize("final, code", [("FINISHED:COMPLETED", 0), ("FINISHED:ABORTED", 1), (None, 1)])
def test_resume_wait_prints_the_final_status_and_fails_unless_completed(tmp_path, capsys, final, code):
    session = FakeSession(tmp_path, settings(), final=final)
    kit = str(tmp_path / "kit")
    assert run(JOB_ID, kit, "me@x.org", wait=True, timeout=60, session_factory=fake_factory(session, [])) == code
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (f"job new-job: {final}" if final else "job new-job: still RUNNING after 60 s")


@pytest.mark.parametrize(
    "job, status, job_id, reason",
    [
        (settings(), "RUNNING", JOB_ID, "it is RUNNING: only a stopped job can be continued"),
        (settings(algorithm="fedavg"), "FINISHED:ABANDONED", JOB_ID, "not a FedRef job"),
        (settings(), "FINISHED:ABANDONED", "no-such-job", "no such job: no-such-job"),
        (settings(), "FINISHED:ABANDONED", "../x", "job id = '../x': must be a plain name"),
    ],
)
def test_resume_errors_are_one_line_naming_the_job(tmp_path, capsys, job, status, job_id, reason):
    session = FakeSession(tmp_path, job, status=status)
    assert run(job_id, str(tmp_path / "kit"), session_factory=fake_factory(session, [])) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"fedseg resume: {job_id}: {reason}") and captured.out == ""
    assert not session.submitted


def test_the_cli_refuses_a_folder_that_is_no_admin_kit(tmp_path, capsys):
    assert main(["resume", JOB_ID, "--startup-kit", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"fedseg resume: {JOB_ID}: {tmp_path}: not an admin startup kit (no startup/fed_admin.json)"
    ]


def test_the_server_unreachable_is_one_line(tmp_path, capsys):
    def unreachable(user, kit):
        raise ConnectionError("cannot connect to server\nretried 3 times")

    assert run(JOB_ID, str(tmp_path), session_factory=unreachable) == 1
    assert capsys.readouterr().err == f"fedseg resume: {JOB_ID}: cannot connect to server\n"


def test_the_export_and_the_command_write_the_same_continuation(tmp_path):
    """`python -m fedseg.jobs.export --resume-job ID --planned-rounds N` is the manual way to the same job."""
    folder, planned = write_resumed_job(job_definition(downloaded(tmp_path, settings())), JOB_ID, str(tmp_path / "a"))
    exported = export_job(replace(settings(), resume_job=JOB_ID, planned_rounds=planned), str(tmp_path / "b"))
    assert controller_args(folder) == controller_args(exported)
