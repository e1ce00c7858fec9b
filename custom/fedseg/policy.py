"""Which component classes a FedRef-Seg job may build on a site and on the server (FLARE's class allow-list).

A non-BYOC job can only name classes the machine allow-lists in ``local/resources.json``. These lists hold
our own classes and the NVFlare classes our jobs use that cannot run job-controlled code: no
``ClientAPIExecutor`` (its ``external_process`` mode runs any command a job names) and nothing that builds
an arbitrary class from a job's arguments except ``PTFileModelPersistor``, whose model path is itself
checked against the server's list. ``fedseg install-policy`` writes them into a kit; ``fedseg simulate``
uses the same lists, so every simulated run exercises them.
"""

from __future__ import annotations

SITE_CLASSES = (
    "fedseg.executor.SiteExecutor",
    "nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
    # added by FLARE itself where the kit allows log streaming (allow_log_streaming in resources.json)
    "nvflare.app_common.logging.job_log_streamer.JobLogStreamer",
    # the site's own privacy filter (local/privacy.json)
    "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
    # compressed transfer (fedseg.wire), when a job asks for it
    "nvflare.app_opt.pt.quantization.quantizer.ModelQuantizer",
    "nvflare.app_opt.pt.quantization.dequantizer.ModelDequantizer",
)

SERVER_CLASSES = (
    "nvflare.app_common.logging.job_log_receiver.JobLogReceiver",  # the sites' streamed logs
    "fedseg.controller.FedRefController",
    "fedseg.controller.RecordingFedAvg",
    "fedseg.controller.RecordingFedOpt",
    "fedseg.controller.RecordingScaffold",
    "fedseg.executor.VersionGuard",
    "fedseg.network.FedSegUNet",
    "fedseg.wire.WireSizeMeter",
    "nvflare.app_common.workflows.cross_site_model_eval.CrossSiteModelEval",
    "nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector",
    "nvflare.app_common.widgets.metrics_artifact_writer.MetricsArtifactWriter",
    "nvflare.app_common.widgets.validation_json_generator.ValidationJsonGenerator",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
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


def with_allow_list(resources: dict, role: str) -> dict:
    """A ``resources.json`` content with this role's allow-list, enforced; everything else kept."""
    return {**resources, "class_allow_list": allow_list(role), "class_list_enforcement_mode": "enforce"}
