"""A restarted server lets go of the jobs its previous process left RUNNING (NVFlare 2.9 never does)."""

from __future__ import annotations

import datetime
from types import SimpleNamespace

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey, RunStatus

from fedseg.stale_jobs import AbandonStaleJobs


class JobStore:
    """The job manager's two public calls the component uses, over a dict of job metas."""

    def __init__(self, jobs: dict) -> None:
        self.jobs = jobs

    def get_jobs_by_status(self, statuses, fl_ctx):
        wanted = {s.value for s in statuses}
        return [SimpleNamespace(job_id=i, meta=m) for i, m in self.jobs.items() if m[JobMetaKey.STATUS.value] in wanted]

    def set_status(self, job_id, status, fl_ctx):
        self.jobs[job_id][JobMetaKey.STATUS.value] = status.value


def context(store: JobStore) -> FLContext:
    fl_ctx = FLContext()
    engine = SimpleNamespace(
        get_component=lambda name: store if name == SystemComponents.JOB_MANAGER else None,
        fire_event=lambda event, ctx: None,  # the log events FLARE fires for a warning
    )
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    return fl_ctx


def meta(status: RunStatus, started: datetime.datetime | None) -> dict:
    return {JobMetaKey.STATUS.value: status.value, JobMetaKey.START_TIME.value: started.isoformat() if started else ""}


def test_jobs_of_the_dead_server_become_abandoned_and_nothing_else_changes():
    component = AbandonStaleJobs()
    before = component.process_started - datetime.timedelta(minutes=5)
    after = component.process_started + datetime.timedelta(seconds=1)
    store = JobStore(
        {
            "crashed": meta(RunStatus.RUNNING, before),
            "dispatched": meta(RunStatus.DISPATCHED, None),
            "mine": meta(RunStatus.RUNNING, after),  # started by this server process: left alone
            "done": meta(RunStatus.FINISHED_COMPLETED, before),
            "waiting": meta(RunStatus.SUBMITTED, None),
        }
    )
    component.handle_event(EventType.START_RUN, context(store))  # only the server's start counts
    assert store.jobs["crashed"][JobMetaKey.STATUS.value] == RunStatus.RUNNING.value
    component.handle_event(EventType.SYSTEM_START, context(store))
    assert {i: m[JobMetaKey.STATUS.value] for i, m in store.jobs.items()} == {
        "crashed": "FINISHED:ABANDONED",
        "dispatched": "FINISHED:ABANDONED",
        "mine": "RUNNING",
        "done": "FINISHED:COMPLETED",
        "waiting": "SUBMITTED",
    }
