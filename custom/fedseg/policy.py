"""Which component classes a FedRef-Seg job may build on a site and on the server (FLARE's class allow-list).

A non-BYOC job can only name classes the machine allow-lists in ``local/resources.json``. These lists hold
our own classes and the NVFlare classes our jobs use that cannot run job-controlled code or write to a
job-given path: no ``ClientAPIExecutor`` (its ``external_process`` mode runs any command a job names), no
``PTFileModelPersistor`` (it loads any checkpoint file a job names, unpickling it if the job asks; our
``fedseg.persistor.SeededModelPersistor`` replaces it), no model class (a job could size it before any cap
is checked: the persistor builds the network itself), no ``JobLogReceiver`` (it writes where the job says;
the kit's own log receiver comes from its resources, which the allow-list does not cover). The NVFlare
writers left (TensorBoard, validation JSON, metrics) resolve their job-given folders under the run folder.
``fedseg install-policy`` writes them into a kit, with ``ConfigOnlyJobValidator`` as the kit's app
validator; ``fedseg simulate`` uses the same lists, so every simulated run exercises them.
"""

from __future__ import annotations

import os

from nvflare.apis.app_validation import AppValidator

# what NVFlare's job signing adds to every folder of a submitted job (nvflare.lighter.tool_consts)
SIGNATURE_FILES = (".__nvfl_sig.json", ".__nvfl_submitter.crt")
JOB_CONFIGS = ("config/config_fed_server.json", "config/config_fed_client.json")
CUSTOM_FOLDER = "custom"  # code: NVFlare's BYOC authorization decides (authorization.json: byoc none)

SITE_CLASSES = (
    "fedseg.executor.SiteExecutor",
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
    # added by FLARE itself where the kit allows log streaming (allow_log_streaming in resources.json)
    "nvflare.app_common.logging.job_log_streamer.JobLogStreamer",
    # the site's own privacy filter (local/privacy.json): ours, whose clip a job's step count cannot widen;
    # NVFlare's (clip = gamma x the job's steps) stays allowed for a privacy.json written before it
    "fedseg.privacy.PercentilePrivacy",
    "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
    # compressed transfer (fedseg.wire), when a job asks for it
    "nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer",
    "nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer",
)

SERVER_CLASSES = (
    "fedseg.controller.FedRefController",
    "fedseg.controller.RecordingFedAvg",
    "fedseg.controller.RecordingFedOpt",
    "fedseg.controller.RecordingFedPIDAvg",
    "fedseg.controller.RecordingScaffold",
    "fedseg.executor.VersionGuard",
    "fedseg.persistor.SeededModelPersistor",
    "fedseg.wire.WireSizeMeter",
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval",
    "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector",
    "nvflare.app_common.widgets.metrics_artifact_writer.MetricsArtifactWriter",
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator",
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
    "nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer",
    "nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer",
    # FedOpt's server optimiser (FedAdam, FedAvgM) and its constant schedule
    "torch.optim.Adam",
    "torch.optim.SGD",
    "torch.optim.lr_scheduler.ConstantLR",
)


def allow_list(role: str) -> list[str]:
    """The class allow-list of a ``site`` or the ``server`` (``simulator``: both, one workspace holds all)."""
    if role == "site":
        return list(SITE_CLASSES)
    if role == "server":
        return list(SERVER_CLASSES)
    if role == "simulator":
        return sorted(set(SITE_CLASSES) | set(SERVER_CLASSES))
    raise ValueError(f"unknown role {role!r}: site, server or simulator")


VALIDATOR_PATH = "fedseg.policy.ConfigOnlyJobValidator"


def with_allow_list(resources: dict, role: str) -> dict:
    """A ``resources.json`` content with this role's allow-list, enforced, and the configuration-only app
    validator (FLARE runs it on every app it deploys); everything else kept."""
    return {
        **resources,
        "class_allow_list": allow_list(role),
        "class_list_enforcement_mode": "enforce",
        "app_validator": {"path": VALIDATOR_PATH, "args": {}},
    }


class ConfigOnlyJobValidator(AppValidator):
    """Refuses a deployed app holding anything but its two JSON configs (and FLARE's signature files).

    A job is data: a file beside the configs (a pickle, an ``environment.json`` naming a checkpoint folder, a
    config in another format) is refused at deployment, before anything is built, with one line naming the
    file. ``custom/`` (code) is left to NVFlare's BYOC authorization, so such a job is still refused with
    NVFlare's own "BYOC not permitted" where the policy says ``byoc: none``.
    """

    def validate(self, app_folder: str) -> tuple[str, dict]:
        root = os.path.abspath(app_folder)
        for folder, dirs, files in os.walk(root):
            relative = os.path.relpath(folder, root)
            if relative == CUSTOM_FOLDER or relative.startswith(CUSTOM_FOLDER + os.sep):
                dirs[:] = []
                continue
            for name in sorted(dirs):
                path = os.path.join(folder, name)
                rel = os.path.normpath(os.path.join(relative, name))
                if os.path.islink(path) or rel not in ("config", CUSTOM_FOLDER):
                    return self.refuse(rel, "a job's app may hold only config/ (and custom/, under BYOC rules)"), {}
            for name in sorted(files):
                path = os.path.join(folder, name)
                rel = os.path.normpath(os.path.join(relative, name))
                if os.path.islink(path):
                    return self.refuse(rel, "a symbolic link"), {}
                if name in SIGNATURE_FILES or rel in JOB_CONFIGS:
                    continue
                return self.refuse(rel, f"a job may hold only {' and '.join(JOB_CONFIGS)}"), {}
        return "", {}

    @staticmethod
    def refuse(relative: str, why: str) -> str:
        return f"this server or site refuses the job: its app holds {relative} ({why}; a job is configuration only)"
