"""The job builder: one recipe per algorithm from one set of settings, run in FLARE's simulator or exported.

Everything a researcher tunes lives in ``JobSettings``. A job carries configuration only: the sites run
the installed ``fedseg`` package through ``fedseg.executor.SiteExecutor`` (the training settings are its
arguments), the server its controllers (their settings are constructor arguments), and both sides check
that they have the fedref-seg version the job was built for. Where the sites' data and caches are is the
sites' own business (``fedseg.site_config``); the simulator and POC set it for their local sites.
``byoc=True`` also ships the ``fedseg`` package inside the job, for sites without it installed (simulator,
POC, experiments); a hospital's policy refuses such jobs.
"""

from __future__ import annotations

import atexit
import functools
import glob
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.recipe.sim_env import SimEnv
from nvflare.recipe.utils import add_experiment_tracking

import fedseg
from fedseg.atomic import write_json
from fedseg.checkpoint import buffer_round, find_resume_files
from fedseg.controller import (
    ROUND_METRICS_FILE,
    FedRefController,
    RecordingFedAvg,
    RecordingFedOpt,
    RecordingScaffold,
)
from fedseg.executor import TRAINER_SCRIPT, SiteExecutor, VersionGuard
from fedseg.fedref import (
    DEFAULT_ALPHA_MAX,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_LAMBDA1,
    DEFAULT_LAMBDA2,
    DEFAULT_VARIANT,
    VARIANTS,
)
from fedseg.network import FedSegUNet
from fedseg.persistor import SeededModelPersistor
from fedseg.policy import with_allow_list
from fedseg.server_config import ALGORITHMS as ALGORITHM_NAMES
from fedseg.server_config import SERVER_CONFIG_FILE, plain_name
from fedseg.settings import DEFAULT_PROFILE, TrainingSettings, profile
from fedseg.site_config import site_environment
from fedseg.wire import GPU_QUANTIZATION, WireSizeMeter, check_quantization, quantization_filters

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a source checkout (tests, make jobs)
PACKAGE_DIR = os.path.dirname(os.path.abspath(fedseg.__file__))  # what a BYOC job ships
ALGORITHMS = {
    "fedref": FedRefController,
    "fedavg": RecordingFedAvg,
    "fedprox": RecordingFedAvg,
    "fedadam": RecordingFedOpt,
    "fedavgm": RecordingFedOpt,
    "scaffold": RecordingScaffold,
}
assert tuple(ALGORITHMS) == ALGORITHM_NAMES  # the server's allowed names are these (fedseg.server_config)
PERSISTOR_ID = "persistor"
RUN_INFO_FILE = "run.json"
SIMULATOR_CACHE_NAME = "fedseg_cache"  # beside the run folders of a simulator workspace
SIMULATOR_STORE_NAME = "fedseg_checkpoints"  # the simulated server's checkpoint store (runs to continue)


@dataclass
class JobSettings(TrainingSettings):
    """What a run is: algorithm, federation, the sites' training (``TrainingSettings``) and the server step."""

    algorithm: str = "fedref"
    profile: str = DEFAULT_PROFILE  # the named training settings this run started from (fedseg.settings)
    sites: list[str] = field(default_factory=lambda: ["site-1", "site-2", "site-3"])
    num_rounds: int = 10
    min_clients: int | None = None
    # the local sites' data and caches, for the simulator and POC only: set in the environment of the site
    # processes they start (fedseg.site_config), never written into the job
    data_root: str | None = None
    cache_dir: str | None = None  # sites' decoded-case caches (default: each site's own; see fedseg.data)
    # FedRef server step (see fedseg.fedref). Defaults from bench.long_horizon (docs/benchmarks.md): the trend
    # prior with lambda1 0, lambda2 0.3 beat the mean prior at 0.1/0.1 on every seed (area under the curve)
    buffer_size: int = DEFAULT_BUFFER_SIZE
    lambda1: float = DEFAULT_LAMBDA1
    lambda2: float = DEFAULT_LAMBDA2
    reference_weighting: str = "uniform"
    lambda2_factor: float = 1.0
    lambda2_every: int = 0
    lambda2_max: float | None = None
    fedref_variant: str = DEFAULT_VARIANT  # the prior: mean | trend | diagonal (fedseg.fedref.VARIANTS)
    fedref_momentum: float = 0.0  # server momentum before the MAP pull (0: none)
    fedref_alpha_max: float = DEFAULT_ALPHA_MAX  # diagonal: the largest share of the pull toward the prior
    # partial participation: sites trained per round, drawn from (seed, round); 0: every site every round
    clients_per_round: int = 0
    validate_absent_sites: bool = True  # sites left out of a round still score its global model (curves cover all)
    # baselines
    fedprox_mu: float = 0.01
    server_lr: float | None = None  # FedAdam: 0.03, FedAvgM: 1.0
    server_momentum: float = 0.9
    # resilience: accepted updates needed to change the global model (default: a majority of the sites; also
    # the job's meta.json min_clients: FLARE deploys the job with that many sites and ends it when fewer stay
    # alive), how long a round waits for the others once that many have answered, and how long the server
    # waits before it treats a site whose job process is gone as dead (FLARE's dead-client grace period)
    wait_after_min_seconds: int = 60
    dead_site_seconds: int = 60
    faults: list[str] = field(default_factory=list)  # trainer drills SITE:KIND:ROUND (sites must allow them)
    cross_site_eval: bool = True
    # compressed transfer of the training task's models and updates through NVFlare's quantisation
    # filters: "float16" anywhere, "blockwise8"/"float4"/"normfloat4" with a GPU on every party
    quantization: str | None = None
    name: str | None = None
    # continue a stopped FedRef run. In a job: resume_job, that run's job id; the server finds its files in its
    # own checkpoint store; with planned_rounds (the total the run is to reach) the server runs only the rounds
    # still to do, else num_rounds more. For the simulator and POC: resume_from, a folder holding the run's
    # files, which they copy into their local server's store (checkpoint_store, never written into the job)
    resume_from: str | None = None
    resume_job: str | None = None
    planned_rounds: int | None = None
    checkpoint_store: str | None = None
    # ship the fedseg package inside the job (bring-your-own-code) for sites that do not have it installed
    byoc: bool = False

    @classmethod
    def for_profile(cls, name: str = DEFAULT_PROFILE, **overrides) -> JobSettings:
        """A profile's training settings with ``overrides`` (any field) applied."""
        return cls(**{**profile(name).training_values(), "profile": name, **overrides})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {sorted(ALGORITHMS)}")
        if self.min_clients is None:
            self.min_clients = len(self.sites) // 2 + 1
        if not 1 <= self.min_clients <= len(self.sites):
            raise ValueError(f"min_clients must be between 1 and the {len(self.sites)} sites, got {self.min_clients}")
        if self.data_root:  # resolved now: the job is built from another working directory
            self.data_root = os.path.abspath(self.data_root)
        if self.cache_dir:
            self.cache_dir = os.path.abspath(self.cache_dir)
        if not self.sites:
            raise ValueError("a federation needs at least one site")
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if not 0 <= self.clients_per_round <= len(self.sites):
            raise ValueError(
                f"clients_per_round must be 0 (every site) to {len(self.sites)}, got {self.clients_per_round}"
            )
        if self.fedref_variant not in VARIANTS:
            raise ValueError(f"unknown fedref_variant {self.fedref_variant!r}; choose one of {VARIANTS}")
        if self.quantization is not None:
            check_quantization(self.quantization)
        if self.resume_job is not None:
            plain_name("resume_job", self.resume_job)
            if self.algorithm != "fedref":
                raise ValueError(f"resume_job: only a fedref run can be continued, not {self.algorithm}")
        if self.planned_rounds is not None:
            if self.resume_job is None:
                raise ValueError("planned_rounds: only a job that continues a stopped run (resume_job) has them")
            if type(self.planned_rounds) is not int or self.planned_rounds < 1:
                raise ValueError(f"planned_rounds must be an integer >= 1, got {self.planned_rounds!r}")

    @property
    def job_name(self) -> str:
        return self.name or f"fedseg_{self.algorithm}"

    def site_executor(self) -> SiteExecutor:
        """What every site runs: the installed trainer with these training settings (and drills, if any)."""
        return SiteExecutor(package_version=fedseg.__version__, training=self.training_values(), drills=self.faults)

    def resume_files(self) -> tuple[str, str, int] | None:
        """(global model checkpoint, reference buffer, next round) of the run in ``resume_from``, if any."""
        if not self.resume_from:
            return None
        model, buffer = find_resume_files(self.resume_from)
        return model, buffer, buffer_round(buffer) + 1

    def server_config(self) -> dict:
        """The local server's ``fedseg_server.json`` for the simulator and POC (empty: the defaults)."""
        return {"checkpoint_store": os.path.abspath(self.checkpoint_store)} if self.checkpoint_store else {}

    def network(self) -> FedSegUNet:
        """The initial global model, seeded: the same settings start every run from the same weights."""
        return self.persistor().network()

    def persistor(self) -> SeededModelPersistor:
        """The server's persistor: it builds the initial global model from the network settings and the seed."""
        return SeededModelPersistor(channels=list(self.channels), init_seed=self.seed)

    def to_json(self) -> dict:
        return asdict(self)


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

    def _prepare_client_apps(self) -> None:
        # instead of NVFlare's ScriptRunner (ClientAPIExecutor + the script copied into the job's custom folder)
        self._job.to_clients(self.settings.site_executor(), tasks=["*"])

    def _create_controller(self, persistor_id, model_params, model_aggregator):
        s = self.settings
        common = dict(
            num_clients=len(s.sites),
            num_rounds=self.num_rounds,
            persistor_id=persistor_id,
            min_clients=s.min_clients,
            wait_after_min_seconds=s.wait_after_min_seconds,
            memory_gc_rounds=self.server_memory_gc_rounds,
            clients_per_round=s.clients_per_round,
            participation_seed=s.seed,
        )
        if s.algorithm != "scaffold":
            common["validate_absent"] = s.validate_absent_sites
        if s.algorithm == "scaffold":
            return RecordingScaffold(**common)
        fedavg = dict(
            common,
            model=model_params,
            save_filename=self.save_filename,
            aggregator=model_aggregator,
            stop_cond=self.stop_cond,
            patience=self.patience,
            task_name="train",
            exclude_vars=self.exclude_vars,
            aggregation_weights=self.aggregation_weights,
        )
        if s.algorithm == "fedref":
            return FedRefController(
                buffer_size=s.buffer_size,
                lambda1=s.lambda1,
                lambda2=s.lambda2,
                reference_weighting=s.reference_weighting,
                lambda2_factor=s.lambda2_factor,
                lambda2_every=s.lambda2_every,
                lambda2_max=s.lambda2_max,
                variant=s.fedref_variant,
                momentum=s.fedref_momentum,
                alpha_max=s.fedref_alpha_max,
                resume_job=s.resume_job,
                planned_rounds=s.planned_rounds,
                **fedavg,
            )
        if s.algorithm == "fedprox":
            return RecordingFedAvg(fedprox_mu=s.fedprox_mu, algorithm_name="fedprox", **fedavg)
        if s.algorithm == "fedadam":
            optimizer = {
                "path": "torch.optim.Adam",
                "config_type": "dict",
                "args": {"lr": s.server_lr or 0.03, "betas": [0.9, 0.99], "eps": 1e-3},
            }
        elif s.algorithm == "fedavgm":
            optimizer = {
                "path": "torch.optim.SGD",
                "config_type": "dict",
                "args": {"lr": s.server_lr or 1.0, "momentum": s.server_momentum},
            }
        else:
            return RecordingFedAvg(**fedavg)
        # "config_type": "dict" keeps FLARE's config loader from building these before FedOpt has a model
        constant = {
            "path": "torch.optim.lr_scheduler.ConstantLR",
            "config_type": "dict",
            "args": {"factor": 1.0, "total_iters": 1},
        }
        return RecordingFedOpt(
            optimizer_args=optimizer,
            lr_scheduler_args=constant,
            algorithm_name=s.algorithm,
            **fedavg,
        )


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


class SimulationError(RuntimeError):
    """The simulator ended without completing every round."""


def run_simulation(settings: JobSettings, workspace_root: str, data_source: str | None = None) -> str:
    """Run the job in FLARE's simulator; returns the run folder (``<workspace_root>/<job name>``).

    The simulator can return normally although a site failed, so completion is judged from the
    artifacts: the server must have written one ``round_metrics.jsonl`` line per round. ``run.json``
    in the run folder records the settings, the data source and the wall time for the report.
    """
    workspace_root = os.path.abspath(workspace_root)
    run_folder = os.path.join(workspace_root, settings.job_name)
    if settings.resume_from and os.path.realpath(settings.resume_from).startswith(os.path.realpath(run_folder)):
        raise ValueError(
            f"resume from {settings.resume_from} into another workspace or job name: "
            f"{run_folder} is cleared before a run"
        )
    if settings.quantization in GPU_QUANTIZATION:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"quantization {settings.quantization!r} runs NVFlare's bitsandbytes quantiser on CUDA "
                "and this machine has no GPU; use float16"
            )
    if os.path.isdir(run_folder):
        shutil.rmtree(run_folder)  # a previous run of the same job; the simulator would mix the two
    if not settings.cache_dir:  # the simulated sites' caches outlive a run: the next run starts at once
        settings = replace(settings, cache_dir=os.path.join(workspace_root, SIMULATOR_CACHE_NAME))
    if settings.resume_from:
        settings = stage_resume(settings, os.path.join(workspace_root, SIMULATOR_STORE_NAME, settings.job_name))
    recipe = build_recipe(settings)
    # the simulator enforces a class allow-list on non-BYOC jobs: ours, the one a hospital installs
    write_json(os.path.join(run_folder, "local", "resources.json"), with_allow_list({"format_version": 2}, "simulator"))
    # the simulated server's own settings (FLARE copies <run>/local into every participant's local/)
    if settings.server_config():
        write_json(os.path.join(run_folder, "local", SERVER_CONFIG_FILE), settings.server_config())
    env = SimEnv(clients=list(settings.sites), num_threads=len(settings.sites), workspace_root=workspace_root)
    started = time.time()
    failure = None
    try:
        with site_environment(
            settings.data_root,
            settings.cache_dir,
            allow_drills=bool(settings.faults),
            allow_scaffold=settings.algorithm == "scaffold",
        ):
            recipe.run(env)
    except Exception as exc:  # the simulator raises for a failed job; we still report what it left
        failure = exc
    wall = time.time() - started
    completed = _completed_rounds(run_folder)
    ok = failure is None and completed >= settings.num_rounds
    reason = None if ok else (f"{failure.__class__.__name__}: {failure}" if failure else "no error raised")
    write_json(
        os.path.join(run_folder, RUN_INFO_FILE),
        {
            "settings": settings.to_json(),
            "data_source": data_source,
            "wall_seconds": wall,
            "mode": "simulator",
            "status": "COMPLETED" if ok else "FAILED",
            "completed": ok,
            "completed_rounds": completed,
            "planned_rounds": settings.num_rounds,
            "reason": reason,
        },
    )
    if not ok:
        raise SimulationError(
            f"simulation of {settings.job_name}: FAILED, {completed} of {settings.num_rounds} rounds ({reason}); "
            f"logs: {run_folder}/<site>/log.txt"
        ) from failure
    return run_folder


RESUMED_RUN_NAME = "resumed"  # the stopped run's plain name in the local server's store


def stage_resume(settings: JobSettings, store: str) -> JobSettings:
    """Copy the stopped run in ``settings.resume_from`` into a local server's checkpoint store (simulator, POC) as
    ``<store>/resumed/``; the job names it (``resume_job``), the local server is told the store."""
    model, buffer, _ = settings.resume_files()
    target = os.path.join(store, RESUMED_RUN_NAME)
    staged = os.path.join(target, "staging")
    if os.path.isdir(staged):
        shutil.rmtree(staged)
    os.makedirs(staged)
    for path in (model, buffer):
        shutil.copy2(path, os.path.join(staged, os.path.basename(path)))
    for path in (model, buffer):  # replace the previous copy only once both files are in
        os.replace(os.path.join(staged, os.path.basename(path)), os.path.join(target, os.path.basename(path)))
    os.rmdir(staged)
    return replace(settings, resume_job=RESUMED_RUN_NAME, checkpoint_store=store)


def _completed_rounds(run_folder: str) -> int:
    paths = glob.glob(os.path.join(run_folder, "**", ROUND_METRICS_FILE), recursive=True)
    if not paths:
        return 0
    with open(sorted(paths, key=len)[0], encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
