"""The one executor a hospital allow-lists: the installed FedRef-Seg trainer, run in the site's own process.

NVFlare's ``ClientAPIExecutor`` can also start any command a job names (``external_process``), so a site
that allow-lists it lets every job run code on its machine. ``SiteExecutor`` takes nothing from the job
but training settings, a package version and (where the site allows them) resilience drills:
- the script is the installed ``fedseg/client.py``, always run in-process;
- the data and cache folders are the site's own (``fedseg.site_config``), never the job's;
- a job built for another fedref-seg version is refused, naming both versions;
- at START_RUN, before anything runs: every training setting must have its exact JSON type and range
  (``fedseg.settings.check_setting``) and stay under the site's caps (``SiteConfig.refusal``); no argument
  of the trainer may hold ``$``, ``{`` or ``}``, which NVFlare's script runner would expand as
  ``${secret:...}`` references to the site's environment or files;
- drills (deliberately bad updates, a site that stops) run only where the site allows them;
- a Scaffold job (control deltas travel in the result's meta, past every privacy filter) runs only where
  the site allows it; the site's local model is sent for cross-site evaluation only where the site shares
  it (``submit_model`` is otherwise answered TASK_UNSUPPORTED: the server goes on with the global model);
- a job process that dies without ending its run (SIGKILL, the OOM killer, a reboot) leaves the exit code
  "unknown" for the site's parent process to read, instead of NVFlare's "exception", so that the server
  treats the site as dead (the round goes on without it) rather than failing everyone's job
  (see ``mark_unfinished_run``).
"""

from __future__ import annotations

import os

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.job_launcher_spec import JobReturnCode
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.client.config import ExchangeFormat
from nvflare.widgets.widget import Widget

import fedseg
from fedseg.settings import TrainingSettings, checked_settings, training_arguments
from fedseg.site_config import ALLOW_DRILLS_ENV, ALLOW_SCAFFOLD_ENV, SITE_CONFIG_FILE, SiteConfig

TRAINER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(fedseg.__file__)), "client.py")
PACKAGE_NAME = "fedref-seg"


class VersionMismatch(RuntimeError):
    """The job was built for another fedref-seg release than the one installed here."""


def require_version(wanted: str, where: str) -> None:
    """Raise ``VersionMismatch`` (one line, both versions) unless the installed package is ``wanted``."""
    if str(wanted) != fedseg.__version__:
        raise VersionMismatch(
            f"{where} refuses the job: it was built for {PACKAGE_NAME} {wanted} and this machine has "
            f"{PACKAGE_NAME} {fedseg.__version__} installed (install {PACKAGE_NAME}=={wanted}, or export the job "
            f"again with {fedseg.__version__})"
        )


EXPANDED = ("$", "{", "}")  # NVFlare's TaskScriptRunner resolves ${secret:NAME} / ${secret:file:PATH} in arguments


def training_settings(training: dict | None) -> TrainingSettings:
    """The job's training settings, checked here: an unknown name, a wrong JSON type or a value out of range
    is an error, not silently converted or ignored (``fedseg.settings.checked_settings``)."""
    return checked_settings(training)


def mark_unfinished_run(run_dir: str) -> str:
    """Record "unknown" as this job process's exit code until its run ends (``clear_unfinished_run``).

    NVFlare's site parent reads the code from this file; without it a killed job process counts as an
    exception, which the server answers by failing the whole job. With "unknown" the parent reports nothing
    the server acts on; the server then finds the job gone from the site and, after its dead-client grace
    period, goes on with the others (down to the job's min_clients). A run that ends normally removes
    the file first, so NVFlare records its real exit code (errors included) as before.
    """
    path = os.path.join(run_dir, FLMetaKey.PROCESS_RC_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(str(JobReturnCode.UNKNOWN))
    return path


def clear_unfinished_run(run_dir: str) -> None:
    """The run ended in this process: let NVFlare write the real exit code."""
    path = os.path.join(run_dir, FLMetaKey.PROCESS_RC_FILE)
    if os.path.exists(path):
        os.remove(path)


def _run_dir(fl_ctx: FLContext) -> str | None:
    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    job_id = fl_ctx.get_job_id()
    return workspace.get_run_dir(job_id) if workspace and job_id else None


class SiteExecutor(ClientAPIExecutor):
    """FedRef-Seg's site trainer (FLARE Client API, in-process) with the site's data and the job's settings.

    Args:
        package_version: the fedref-seg version the job was built for; another installed version refuses it.
        training: ``TrainingSettings`` fields (epochs, crop, network, ...); the rest keep their defaults.
        drills: resilience drills ``SITE:KIND:ROUND`` (tests of the server's defences); refused unless the
            site allows drills in its ``local/fedseg_site.json`` or its environment.
    """

    def __init__(self, package_version: str, training: dict | None = None, drills: list[str] | None = None) -> None:
        require_version(package_version, "this site")
        # kept as given: FLARE's job exporter writes a component's arguments back from these attributes
        self.package_version = package_version
        self.training = dict(training) if isinstance(training, dict) else training  # a non-object: refused at START_RUN
        self.drills = list(drills or [])
        self.settings: TrainingSettings | None = None  # checked at START_RUN, where the site's name is known
        self._site: SiteConfig | None = None
        super().__init__(
            execution_mode="in_process", task_script_path=TRAINER_SCRIPT, params_exchange_format=ExchangeFormat.PYTORCH
        )

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            # the trainer's command line, from the site's own settings: set before the runner is built
            try:
                self._site = self.site_config(fl_ctx)
                self._task_script_args = self.script_arguments(self._site, fl_ctx.get_identity_name())
            except (PermissionError, ValueError) as exc:
                self.log_error(fl_ctx, str(exc))
                self.system_panic(str(exc), fl_ctx)
                return
            if _run_dir(fl_ctx) and not self._simulated(fl_ctx):
                mark_unfinished_run(_run_dir(fl_ctx))
        elif event_type == EventType.END_RUN and _run_dir(fl_ctx):
            clear_unfinished_run(_run_dir(fl_ctx))
        super().handle_event(event_type, fl_ctx)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """Refuse what would send tensors past the site's privacy filters, before the trainer sees the task."""
        site = self._site or SiteConfig()
        name = fl_ctx.get_identity_name() or "this site"
        if task_name == AppConstants.TASK_SUBMIT_MODEL and not site.share_local_model:
            # not an error: CrossSiteModelEval logs it, keeps no model for this site and scores the global one
            self.log_warning(
                fl_ctx,
                f"{name} does not share its local model for cross-site evaluation "
                f"(share_local_model in local/{SITE_CONFIG_FILE})",
            )
            return make_reply(ReturnCode.TASK_UNSUPPORTED)
        if not site.allow_scaffold and _is_scaffold(shareable):
            line = (
                f"{name} refuses the job: it is a Scaffold job, whose control deltas leave the site past its "
                f"privacy filters, and this site does not allow Scaffold (allow_scaffold in local/"
                f"{SITE_CONFIG_FILE}, or {ALLOW_SCAFFOLD_ENV}=1)"
            )
            self.log_error(fl_ctx, line)
            # NVFlare's own answer to an unsafe job: the site marks it unsafe and replies UNSAFE_JOB, on which
            # the server aborts the job (a system_panic here would stop the site before that reply leaves)
            raise UnsafeJobError(line)
        return super().execute(task_name, shareable, fl_ctx, abort_signal)

    @staticmethod
    def _simulated(fl_ctx: FLContext) -> bool:
        """The simulator runs every site in one process and reads no exit-code file of ours."""
        return bool(fl_ctx.get_prop(FLContextKey.SIMULATE_MODE, False))

    @staticmethod
    def site_config(fl_ctx: FLContext) -> SiteConfig:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        return SiteConfig.load(workspace.get_site_config_dir() if workspace else None)

    def script_arguments(self, site: SiteConfig, site_name: str = "this site") -> str:
        """The trainer's arguments: the job's training settings, the site's folders, drills if allowed.

        Raises (one line, ``<site> refuses the job: ...``) for a setting of the wrong type or range, one over a
        cap of the site, drills the site does not allow, or an argument NVFlare would expand or split.
        """
        try:
            self.settings = training_settings(self.training)
        except ValueError as exc:
            raise ValueError(f"{site_name} refuses the job: {exc}") from None
        over = site.refusal(self.settings)
        if over:
            raise PermissionError(f"{site_name} refuses the job: {over}")
        if self.drills and not site.allow_drills:
            raise PermissionError(
                f"{site_name} refuses the job: it asks for resilience drills {self.drills} and this site does not "
                f"allow them (allow_drills in local/{SITE_CONFIG_FILE}, or {ALLOW_DRILLS_ENV}=1)"
            )
        args = training_arguments(self.settings) + ["--min_val_cases", str(site.min_val_cases)]
        if site.data_root:
            args += ["--data_root", site.data_root]
        if site.cache_dir:
            args += ["--cache_dir", site.cache_dir]
        for drill in self.drills:
            args += ["--fault", drill]
        args = [str(a) for a in args]
        spaced = [a for a in args if not a or any(c.isspace() for c in a)]
        if spaced:  # FLARE splits the trainer's command line on whitespace, and keeps quotes as they are
            raise ValueError(
                f"{site_name}: {spaced[0]!r} cannot be passed to the trainer (empty or with whitespace); "
                f"use a folder without spaces in local/{SITE_CONFIG_FILE}"
            )
        expanded = [a for a in args if any(c in a for c in EXPANDED)]
        if expanded:  # strict types keep them out of the settings; drills and the site's folders are text
            raise ValueError(
                f"{site_name} refuses the job: trainer argument {expanded[0]!r} holds $, {{ or }}, which NVFlare "
                f"would expand as a secret reference (a drill, or a folder in local/{SITE_CONFIG_FILE})"
            )
        return " ".join(args)


def _is_scaffold(shareable: Shareable) -> bool:
    """A task from NVFlare's Scaffold controller: its global control variates ride in the model's meta."""
    try:
        return AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL in (from_shareable(shareable).meta or {})
    except ValueError:  # not a DXO (e.g. submit_model's bare request)
        return False


class VersionGuard(Widget):
    """Server side of the version check: the server refuses a job built for another fedref-seg release."""

    def __init__(self, package_version: str) -> None:
        super().__init__()
        require_version(package_version, "the server")
        self.package_version = package_version
