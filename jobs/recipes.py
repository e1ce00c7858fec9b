"""The job builder: one recipe per algorithm from one set of settings (``fedseg.jobs.settings.JobSettings``).

A job carries configuration only: the sites run the installed ``fedseg`` package through
``fedseg.executor.SiteExecutor`` (the training settings are its arguments), the server its controllers (their
settings are constructor arguments), and both sides check that they have the fedref-seg version the job was built
for. Where the sites' data and caches are is the sites' own business (``fedseg.site_config``); the simulator and
POC set it for their local sites. ``byoc=True`` also ships the ``fedseg`` package inside the job, for sites without
it installed (simulator, POC, experiments); a hospital's policy refuses such jobs.

The simulator runner lives in ``fedseg.jobs.simulate``; its names are importable from here too, as before.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

from nvflare.app_common.app_constant import DefaultCheckpointFileName
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe.utils import add_experiment_tracking

import fedseg
from fedseg.controller import (
    FedRefController,
    RecordingFedAvg,
    RecordingFedOpt,
    RecordingFedPIDAvg,
    RecordingScaffold,
)
from fedseg.executor import TRAINER_SCRIPT, VersionGuard
from fedseg.jobs.settings import JobSettings, server_arguments
from fedseg.server_config import ALGORITHMS as ALGORITHM_NAMES
from fedseg.wire import WireSizeMeter, quantization_filters

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a source checkout (tests, make jobs)
PACKAGE_DIR = os.path.dirname(os.path.abspath(fedseg.__file__))  # what a BYOC job ships
PERSISTOR_ID = "persistor"


def _server_optimizer(settings: JobSettings) -> dict:
    """FedOpt's server optimiser and a constant schedule. ``"config_type": "dict"`` keeps FLARE's config loader
    from building them before FedOpt has a model."""
    optimizers = {
        "fedadam": {"path": "torch.optim.Adam", "args": {"betas": [0.9, 0.99], "eps": 1e-3}},
        "fedavgm": {"path": "torch.optim.SGD", "args": {"momentum": settings.server_momentum}},
    }
    chosen = optimizers[settings.algorithm]
    return {
        "optimizer_args": {
            "path": chosen["path"],
            "config_type": "dict",
            "args": {"lr": settings.effective_server_lr, **chosen["args"]},
        },
        "lr_scheduler_args": {
            "path": "torch.optim.lr_scheduler.ConstantLR",
            "config_type": "dict",
            "args": {"factor": 1.0, "total_iters": 1},
        },
        "algorithm_name": settings.algorithm,
    }


class Controller(NamedTuple):
    """An algorithm's server controller and the keywords it takes beyond the fields' (``server_arguments``)."""

    cls: type
    extra: Callable[[JobSettings], dict] = lambda settings: {}


CONTROLLERS = {
    "fedref": Controller(FedRefController),
    "fedavg": Controller(RecordingFedAvg),
    "fedprox": Controller(RecordingFedAvg, lambda settings: {"algorithm_name": "fedprox"}),
    "fedadam": Controller(RecordingFedOpt, _server_optimizer),
    "fedavgm": Controller(RecordingFedOpt, _server_optimizer),
    "scaffold": Controller(RecordingScaffold),
    "fedpidavg": Controller(RecordingFedPIDAvg),
}
ALGORITHMS = {name: controller.cls for name, controller in CONTROLLERS.items()}
assert tuple(ALGORITHMS) == ALGORITHM_NAMES  # the server's allowed names are these (fedseg.server_config)

# NVFlare's FedAvg keywords (what FedAvgRecipe._create_controller passes) that an algorithm's controller does not
# take, each with the only value it can stand for: a recipe that sets another is refused, with the reason
NOT_TAKEN: dict[str, tuple[str, dict[str, Any]]] = {
    "scaffold": (
        "NVFlare's Scaffold controller sends the global model and control variates through its persistor; it has "
        "no model argument, best-model file, aggregator, stopping rule, task name, excluded variables or weights",
        {
            "model": None,
            "save_filename": DefaultCheckpointFileName.GLOBAL_MODEL,
            "aggregator": None,
            "stop_cond": None,
            "patience": None,
            "task_name": "train",
            "exclude_vars": None,
            "aggregation_weights": None,
        },
    ),
}


class FedSegRecipe(FedAvgRecipe):
    """NVFlare's PyTorch FedAvg recipe (job layout, persistor, Client API runner) with our controllers."""

    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        if settings.resume_from and not settings.resume_job:
            raise ValueError(
                "resume_from is a folder on this machine: run it through run_simulation or `fedseg poc`, "
                "which give the job resume_job (the stopped run's id in the server's store)"
            )
        super().__init__(
            name=settings.job_name,
            model_persistor=settings.persistor(),  # instead of PTFileModelPersistor: no file a job could name
            model_locator=PTFileModelLocator(pt_persistor_id=PERSISTOR_ID),  # cross-site evaluation's models
            # meta.json's min_clients: FLARE starts the job with this many sites and fails it only when fewer
            # stay alive; the controller asks every site each round and needs this many answers (one setting)
            min_clients=settings.min_clients,
            num_rounds=settings.num_rounds,
            train_script=TRAINER_SCRIPT,  # NVFlare's check only: the sites get SiteExecutor, not a script
            key_metric="dice_mean",
        )
        self._job.to_server(VersionGuard(package_version=fedseg.__version__), id="version_guard")
        self.add_server_config(dead_site_config(settings.dead_site_seconds))

    def _apply_per_site_config(self, config: dict) -> None:
        raise ValueError(
            f"per_site_config ({', '.join(sorted(config))}) is refused: every site runs the same SiteExecutor with "
            "the job's training settings (NVFlare's per-site keys configure a training script, which these jobs do "
            "not ship); choose the sites with JobSettings.sites, and a site's own limits in its fedseg_site.json"
        )

    def _prepare_client_apps(self) -> None:
        # instead of NVFlare's ScriptRunner (ClientAPIExecutor + the script copied into the job's custom folder)
        if self.per_site_config is not None:  # set_per_site_config refuses it; this guards a direct assignment
            self._apply_per_site_config(self.per_site_config)
        self._job.to_clients(self.settings.site_executor(), tasks=["*"])

    def _fedavg_arguments(self, persistor_id, model_params, model_aggregator) -> dict[str, Any]:
        """What NVFlare's FedAvgRecipe._create_controller passes its FedAvg, with the whole federation as
        ``num_clients`` (NVFlare passes min_clients: our controllers ask every site and need min_clients answers)."""
        return dict(
            num_clients=len(self.settings.sites),
            num_rounds=self.num_rounds,
            persistor_id=persistor_id,
            model=model_params,
            save_filename=self.save_filename,
            aggregator=model_aggregator,
            stop_cond=self.stop_cond,
            patience=self.patience,
            task_name="train",
            exclude_vars=self.exclude_vars,
            aggregation_weights=self.aggregation_weights,
            memory_gc_rounds=self.server_memory_gc_rounds,
            enable_tensor_disk_offload=self.enable_tensor_disk_offload,
            **self._get_controller_kwargs(),
        )

    def _create_controller(self, persistor_id, model_params, model_aggregator):
        s = self.settings
        controller = CONTROLLERS[s.algorithm]
        arguments = self._fedavg_arguments(persistor_id, model_params, model_aggregator)
        reason, only = NOT_TAKEN.get(s.algorithm, ("", {}))
        for name, value in only.items():
            given = arguments.pop(name)
            if given != value:
                raise ValueError(f"{s.algorithm}: {name} = {given!r} is refused: {reason}")
        arguments.update(participation_seed=s.seed, **server_arguments(s), **controller.extra(s))
        return controller.cls(**arguments)


def add_global_model_evaluation(recipe: FedSegRecipe) -> None:
    """Cross-site evaluation of the server's models on every site, without asking any site for its local model.

    NVFlare's ``add_cross_site_evaluation`` also sends ``submit_model``: each site would send its full local
    model (WEIGHTS, which the sites' privacy filter on WEIGHT_DIFF does not touch) and the server would forward
    it to the other sites. CrossSiteModelEval's own switch for "server models only" is an empty
    ``submit_model_task_name``; it reads the models through the recipe's locator (FedAvgRecipe's ``locator_id``).
    """
    recipe._job.to_server(
        CrossSiteModelEval(model_locator_id=recipe._job.comp_ids["locator_id"], submit_model_task_name="")
    )


def dead_site_config(seconds: int) -> dict:
    """FLARE's server settings for a site whose job process is gone: after ``seconds`` it counts as dead, and a
    task waiting only for dead sites ends then (both default to 60 s and 30 s in FLARE)."""
    return {"dead_client_grace_period": seconds, "dead_client_check_lead_time": seconds}


def build_recipe(settings: JobSettings) -> FedSegRecipe:
    """The job for these settings: SiteExecutor on every site, the algorithm's controller on the server."""
    recipe = FedSegRecipe(settings)
    if settings.byoc:  # the package travels in the job's custom folders, as it is
        recipe.add_client_file(byoc_source())
        recipe.add_server_file(byoc_source())
    else:  # installed on every site and the server: FLARE must not copy our modules into the job
        recipe._job.set_app_packages([fedseg.__name__])
    add_experiment_tracking(recipe, "tensorboard")  # the sites' per-round scalars, in the server's TensorBoard
    if settings.quantization:
        add_compressed_transfer(recipe, settings.quantization)
    if settings.cross_site_eval:  # the global model on every site; no site's local model is asked for
        add_global_model_evaluation(recipe)
    return recipe


@functools.cache
def byoc_source() -> str:
    """A folder holding (a link to) the package as ``fedseg/``: FLARE copies a folder's contents into
    ``custom/``, and the package must arrive there under its own name. Removed when this process ends."""
    staging = tempfile.mkdtemp(prefix="fedseg_byoc_")
    atexit.register(shutil.rmtree, staging, True)
    os.symlink(PACKAGE_DIR, os.path.join(staging, fedseg.__name__))
    return staging


def add_compressed_transfer(recipe: FedSegRecipe, quantization: str) -> None:
    """Quantise the training task's models both ways; the server measures what crossed (fedseg.wire).

    Only the "train" task is compressed: cross-site evaluation then scores the models the federation
    really produced, so a Dice difference is the cost of the compressed training, not of the scoring.
    """
    tasks = ["train"]
    quantizer, dequantizer = quantization_filters(quantization)
    recipe.add_server_output_filter(quantizer, tasks=tasks)
    recipe.add_server_output_filter(WireSizeMeter(), tasks=tasks)
    recipe.add_server_input_filter(WireSizeMeter(), tasks=tasks)
    recipe.add_server_input_filter(dequantizer, tasks=tasks)
    site_quantizer, site_dequantizer = quantization_filters(quantization)
    recipe.add_client_input_filter(site_dequantizer, tasks=tasks)
    recipe.add_client_output_filter(site_quantizer, tasks=tasks)


# the simulator runner's names, where they were before it had its own module (imported on first use: it imports us)
MOVED = {
    name: "fedseg.jobs.simulate"
    for name in (
        "RESUMED_RUN_NAME",
        "RUN_INFO_FILE",
        "SIMULATOR_CACHE_NAME",
        "SIMULATOR_STORE_NAME",
        "SimulationError",
        "run_simulation",
        "stage_resume",
    )
}


def __getattr__(name: str):
    if name in MOVED:
        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
