"""A server that starts again marks the jobs its previous life left running as FINISHED:ABANDONED.

NVFlare 2.9 leaves a job that was running when its server died listed as RUNNING for good (its
``JobRunner.update_unfinished_jobs``, which would mark it ABANDONED, is never called): ``abort_job`` answers
"not running", ``download_job`` waits for it to finish, and nothing can continue it. ``AbandonStaleJobs``, a
component of the server's ``local/resources.json`` (``fedseg install-policy server`` adds it), does what that
method was meant to, through the job manager's public interface: at SYSTEM_START every job listed RUNNING or
DISPATCHED that started before this server process is set to FINISHED:ABANDONED, with one warning line each.
"""

from __future__ import annotations

import datetime

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import JobMetaKey, RunStatus

COMPONENT_ID = "fedseg_abandon_stale_jobs"
COMPONENT_PATH = "fedseg.stale_jobs.AbandonStaleJobs"


def _started(meta: dict) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(str(meta.get(JobMetaKey.START_TIME.value)))
    except ValueError:
        return None  # never started (DISPATCHED) or no time recorded


class AbandonStaleJobs(FLComponent):
    """At server start: RUNNING/DISPATCHED jobs of the server's previous process become FINISHED:ABANDONED."""

    def __init__(self) -> None:
        super().__init__()
        self.process_started = datetime.datetime.now(datetime.timezone.utc)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.SYSTEM_START:
            return
        manager = fl_ctx.get_engine().get_component(SystemComponents.JOB_MANAGER)
        if manager is None:
            return
        for job in manager.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx):
            started = _started(job.meta)
            if started is not None and started >= self.process_started:
                continue  # this process runs it
            was = job.meta.get(JobMetaKey.STATUS.value)
            manager.set_status(job.job_id, RunStatus.ABANDONED, fl_ctx)
            self.log_warning(
                fl_ctx,
                f"job {job.job_id} was {was} when the server stopped: now {RunStatus.ABANDONED.value} "
                f"(a FedRef run continues with `fedseg resume {job.job_id}`)",
            )
