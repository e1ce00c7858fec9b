"""What a run is: ``JobSettings``, each field declared once with its help text, its group and where it goes.

``JobSettings`` extends the sites' ``TrainingSettings`` (``fedseg.settings``) with the algorithm, the federation,
the server step and the run. The run commands (``fedseg simulate``, ``compare``, ``poc``, ``demo``) and the job
exporter (``python -m fedseg.jobs.export``) make their options from the fields and build the settings back from
what was given (``fedseg.jobs.options``); the recipe (``fedseg.jobs.recipes``) and the exporter read the
controllers' keywords from them (``server_arguments``). A new setting is one declaration here.

A field's scope says where it goes: ``job`` fields are written into the job and offered by every run command and
the exporter; ``local`` fields say where this machine keeps data, caches and a stopped run, are offered by the
run commands that take them (``fedseg.jobs.options.COMMANDS``) and never reach a job; ``export`` fields only the
exporter writes (``resume_job``, ``planned_rounds``: a continuation the server finds in its own store);
``internal`` fields are set by the commands themselves (the reason is their help text).

This module stays light (no torch, no MONAI): the run commands build their parsers from it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from fedseg import fets_challenge
from fedseg.challenge_rounds import check_plan
from fedseg.fedref import (
    DEFAULT_ALPHA_MAX,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_LAMBDA1,
    DEFAULT_LAMBDA2,
    DEFAULT_VARIANT,
    REFERENCE_WEIGHTINGS,
    VARIANTS,
)
from fedseg.fets_challenge import WEEK_SECONDS
from fedseg.pidavg import ALPHA, BETA, GAMMA, MAX_WINDOW, WINDOW
from fedseg.server_config import ALGORITHMS as ALGORITHM_NAMES
from fedseg.server_config import plain_name
from fedseg.settings import (
    DEFAULT_PROFILE,
    DEFAULT_SITES,
    PROFILES,
    TrainingSettings,
    profile,
)
from fedseg.wire import QUANTIZATION_TYPES, check_quantization

JOB, LOCAL, EXPORT, INTERNAL = "job", "local", "export", "internal"
# argument groups, in the order a command's help shows them: (title, what they hold)
GROUPS = {
    "run": "the run",
    "federation": "the federation: its sites, who trains each round, and how long the server waits",
    "fedref": "FedRef's server step (fedseg.fedref)",
    "baselines": "the baselines' server step",
    "transfer": "what the job ships and sends",
    "resume": "continuing a stopped FedRef run",
    "machine": "this machine (never written into a job)",
}
FEDREF = ("fedref",)
NOT_SCAFFOLD = tuple(a for a in ALGORITHM_NAMES if a != "scaffold")  # Scaffold sends its task blocking
DEFAULT_SERVER_LR = {"fedadam": 0.03, "fedavgm": 1.0}  # the server optimiser's step without --server-lr


def _job(
    default: Any = MISSING,
    help_text: str = "",
    *,
    group: str,
    scope: str = JOB,
    factory: Any = MISSING,
    option: str | None = None,
    plural: str | None = None,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    append: bool = False,
    server_arg: str | bool | None = None,
    algorithms: tuple[str, ...] | None = None,
):
    """A job field: its help text and group (shown by every command that offers it), where it goes (``scope``)
    and how it is given: ``option`` (default: ``--`` + the dashed name; a bool is a flag that turns its default
    round), ``plural`` (the option of a command that runs once per value), ``append`` (a repeatable option).
    ``server_arg``: the controller's keyword for it (True: the field's name), for ``algorithms`` (default: every
    algorithm)."""
    assert group in GROUPS, group
    metadata = {
        "help": help_text,
        "group": group,
        "scope": scope,
        "option": option,
        "plural": plural,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
        "append": append,
        "server_arg": server_arg,
        "algorithms": algorithms,
    }
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _fedref(default: Any, help_text: str, *, server_arg: str | None = None, **options):
    """A FedRef setting: the FedRef controller's keyword of the same name (or ``server_arg``)."""
    return _job(
        default, "FedRef: " + help_text, group="fedref", server_arg=server_arg or True, algorithms=FEDREF, **options
    )


def _pid(default: Any, help_text: str):
    """A FedPIDAvg constant: the FedPIDAvg controller's keyword of the same name."""
    return _job(default, "FedPIDAvg: " + help_text, group="baselines", server_arg=True, algorithms=("fedpidavg",))


@dataclass
class JobSettings(TrainingSettings):
    """What a run is: algorithm, federation, the sites' training (``TrainingSettings``) and the server step."""

    algorithm: str = _job(
        "fedref", "the federated algorithm", group="run", choices=ALGORITHM_NAMES, plural="--algorithms"
    )
    profile: str = _job(
        DEFAULT_PROFILE,
        "named training settings: demo (synthetic 64x64x48) or fets2022 (full-size FeTS2022); "
        "the training options override single values",
        group="run",
        choices=sorted(PROFILES),
    )
    sites: list[str] = _job(
        help_text="the FLARE client names of the sites (each site's prepared folder has its name)",
        group="federation",
        factory=lambda: list(DEFAULT_SITES),
    )
    num_rounds: int = _job(10, "federated rounds", group="run", option="--rounds")
    # accepted updates needed to change the global model; also the job's meta.json min_clients: FLARE deploys
    # the job with that many sites and ends it when fewer stay alive
    min_clients: int | None = _job(
        None,
        "answers a round needs, and sites the job needs alive (default: a majority of the sites)",
        group="federation",
        server_arg="min_clients",
    )
    # the local sites' data and caches, for the simulator and POC only: set in the environment of the site
    # processes they start (fedseg.site_config), never written into the job
    data_root: str | None = _job(None, "folder of prepared site folders", group="machine", scope=LOCAL)
    cache_dir: str | None = _job(
        None,
        "where the sites cache decoded cases (default: each site's FEDSEG_CACHE_DIR, else fedseg_cache in "
        "its workspace)",
        group="machine",
        scope=LOCAL,
    )
    # FedRef server step (see fedseg.fedref). Defaults from bench.long_horizon (docs/benchmarks.md): the trend
    # prior with lambda1 0, lambda2 0.3 beat the mean prior at 0.1/0.1 on every seed (area under the curve)
    buffer_size: int = _fedref(DEFAULT_BUFFER_SIZE, "global models in the reference buffer (p)", option="--p")
    lambda1: float = _fedref(DEFAULT_LAMBDA1, "pull toward the last global model")
    lambda2: float = _fedref(DEFAULT_LAMBDA2, "pull toward the reference model")
    reference_weighting: str = _fedref(
        "uniform",
        "weights of the buffered models in the reference (linear: the newest weighs most)",
        choices=REFERENCE_WEIGHTINGS,
    )
    lambda2_factor: float = _fedref(1.0, "lambda2 is multiplied by this every --lambda2-every rounds")
    lambda2_every: int = _fedref(0, "rounds between two steps of the lambda2 schedule (0: lambda2 stays as given)")
    lambda2_max: float | None = _fedref(None, "the largest lambda2 the schedule reaches (default: no cap)")
    fedref_variant: str = _fedref(
        DEFAULT_VARIANT,
        "the prior: mean of the last p globals, their trend one round ahead, or a per-layer "
        "(diagonal) prior on the trend",
        choices=VARIANTS,
        server_arg="variant",
    )
    fedref_momentum: float = _fedref(0.0, "server momentum before the MAP pull (0: none)", server_arg="momentum")
    fedref_alpha_max: float = _fedref(
        DEFAULT_ALPHA_MAX, "diagonal prior: the largest share of the pull toward the prior", server_arg="alpha_max"
    )
    clients_per_round: int = _job(
        0,
        "sites trained per round, drawn from the seed and the round (0: every site every round)",
        group="federation",
        server_arg="clients_per_round",
    )
    selection_policy: str = _job(
        "",
        "who trains each round, by a FeTS Challenge policy: all, random:K, largest:K or drop_slow:N (largest and "
        "drop_slow read --challenge-clock's sizes and times; empty: --clients-per-round)",
        group="federation",
        server_arg=True,
    )
    # the FeTS Challenge clock (fedseg.fets_challenge): the job carries clock_cases, read here from the CSV
    challenge_clock: str | None = _job(
        None,
        "price every round on the FeTS Challenge's simulated clock with this partitioning CSV's case counts "
        "(the challenge used partitioning_2.csv); the sites are named site-<partition>",
        group="machine",
        scope=LOCAL,
        metavar="CSV",
    )
    clock_cases: dict | None = _job(
        None,
        "site -> [training, validation] cases the clock prices: set by the run commands from --challenge-clock",
        group="federation",
        scope=INTERNAL,
        server_arg=True,
    )
    time_budget_seconds: int = _job(
        WEEK_SECONDS,
        "with --challenge-clock: the run ends after the round whose simulated time passes this (the challenge's "
        "week); --rounds stays the most it runs",
        group="federation",
        server_arg=True,
    )
    validate_absent_sites: bool = _job(
        True,
        "sites left out of a round still score its global model, so the curves cover every site",
        group="federation",
        server_arg="validate_absent",
        algorithms=NOT_SCAFFOLD,
    )
    fedprox_mu: float = _job(
        0.01,
        "FedProx: weight of the proximal term the sites add to their loss",
        group="baselines",
        server_arg="fedprox_mu",
        algorithms=("fedprox",),
    )
    server_lr: float | None = _job(
        None,
        "FedAdam/FedAvgM: the server optimiser's learning rate (default: "
        + ", ".join(f"{a} {lr}" for a, lr in DEFAULT_SERVER_LR.items())
        + ")",
        group="baselines",
    )
    server_momentum: float = _job(0.9, "FedAvgM: the server optimiser's momentum", group="baselines")
    # FedPIDAvg's weights (fedseg.pidavg): alpha s_j/S + beta k_j/K + gamma m_j/I, the paper's constants
    pid_alpha: float = _pid(ALPHA, "weight of the site's share of the training cases (alpha + beta + gamma = 1)")
    pid_beta: float = _pid(BETA, "weight of the drop of the site's training loss since its last round")
    pid_gamma: float = _pid(GAMMA, "weight of the mean of the site's recent training losses")
    pid_window: int = _pid(WINDOW, f"rounds of losses in that mean, this one included (1 to {MAX_WINDOW})")
    wait_after_min_seconds: int = _job(
        60,
        "how long a round waits for the other sites once --min-clients have answered",
        group="federation",
        server_arg="wait_after_min_seconds",
    )
    dead_site_seconds: int = _job(
        60,
        "how long the server waits before it treats a site whose job process is gone as dead "
        "(FLARE's dead-client grace period)",
        group="federation",
    )
    faults: list[str] = _job(
        help_text="resilience drill (repeatable): at ROUND, SITE sends a NaN (nan) or wrongly shaped (shape) "
        "update, or stops (die); the sites must allow drills",
        group="transfer",
        factory=list,
        option="--fault",
        metavar="SITE:KIND:ROUND",
        append=True,
    )
    cross_site_eval: bool = _job(
        True, "score the final global model on every site's validation cases", group="transfer"
    )
    # compressed transfer of the training task's models and updates through NVFlare's quantisation filters
    quantization: str | None = _job(
        None,
        "compress the training transfer with NVFlare's quantisation filters: float16 anywhere, the 8/4-bit "
        "types with a GPU on every party",
        group="transfer",
        choices=QUANTIZATION_TYPES,
    )
    name: str | None = _job(None, "the job's name (default: fedseg_<algorithm>)", group="run")
    # continue a stopped FedRef run. In a job: resume_job, that run's job id; the server finds its files in its
    # own checkpoint store; with planned_rounds the server runs only the rounds still to do, else num_rounds more.
    # For the simulator and POC: resume_from, a folder holding the run's files, which they copy into their local
    # server's store (checkpoint_store)
    resume_from: str | None = _job(
        None,
        "continue a stopped FedRef run from its last global model and reference buffer (a folder holding "
        "them, e.g. the stopped run's --out); --rounds is then the total the run should reach",
        group="resume",
        scope=LOCAL,
    )
    resume_job: str | None = _job(
        None,
        "fedref: continue this stopped job (the server finds its checkpoints in its own store)",
        group="resume",
        scope=EXPORT,
        metavar="JOB_ID",
        server_arg="resume_job",
        algorithms=FEDREF,
    )
    planned_rounds: int | None = _job(
        None,
        "with --resume-job: the total rounds the run is to reach; the server runs only those still to do "
        "(instead of --rounds more)",
        group="resume",
        scope=EXPORT,
        metavar="N",
        server_arg="planned_rounds",
        algorithms=FEDREF,
    )
    checkpoint_store: str | None = _job(
        None,
        "the local server's store of stopped runs: set by the simulator and POC from --resume-from",
        group="resume",
        scope=INTERNAL,
    )
    # bring-your-own-code: for sites that do not have the package installed (a hospital's policy refuses it)
    byoc: bool = _job(
        False, "ship the fedseg package inside the job, for sites without it (POC, experiments)", group="transfer"
    )

    @classmethod
    def for_profile(cls, profile_name: str = DEFAULT_PROFILE, /, **overrides) -> JobSettings:
        """A profile's training settings with ``overrides`` (any field, ``name`` included) applied."""
        return cls(**{**profile(profile_name).training_values(), "profile": profile_name, **overrides})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm not in ALGORITHM_NAMES:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; choose one of {sorted(ALGORITHM_NAMES)}")
        if self.min_clients is None:
            self.min_clients = len(self.sites) // 2 + 1
        if not 1 <= self.min_clients <= len(self.sites):
            raise ValueError(f"min_clients must be between 1 and the {len(self.sites)} sites, got {self.min_clients}")
        for name in ("data_root", "cache_dir", "resume_from"):  # resolved now: the job is built elsewhere
            if getattr(self, name):
                setattr(self, name, os.path.abspath(getattr(self, name)))
        if not self.sites:
            raise ValueError("a federation needs at least one site")
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if not 0 <= self.clients_per_round <= len(self.sites):
            raise ValueError(
                f"clients_per_round must be 0 (every site) to {len(self.sites)}, got {self.clients_per_round}"
            )
        self._check_challenge()
        if self.fedref_variant not in VARIANTS:
            raise ValueError(f"unknown fedref_variant {self.fedref_variant!r}; choose one of {VARIANTS}")
        if self.quantization is not None:
            check_quantization(self.quantization)
        self._check_resume()

    def _check_challenge(self) -> None:
        """The clock's case counts from the CSV, per site; then the server's own checks of the plan."""
        if self.challenge_clock:
            self.challenge_clock = os.path.abspath(self.challenge_clock)
            self.clock_cases = fets_challenge.clock_cases(self.challenge_clock, self.sites)
        check_plan(self.selection_policy, self.clients_per_round, self.clock_cases, self.time_budget_seconds)

    def _check_resume(self) -> None:
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

    @property
    def effective_server_lr(self) -> float:
        """The server optimiser's learning rate (FedAdam, FedAvgM): ``server_lr``, else the algorithm's default."""
        return self.server_lr or DEFAULT_SERVER_LR[self.algorithm]

    def site_executor(self):
        """What every site runs: the installed trainer with these training settings (and drills, if any)."""
        import fedseg
        from fedseg.executor import SiteExecutor

        return SiteExecutor(package_version=fedseg.__version__, training=self.training_values(), drills=self.faults)

    def resume_files(self) -> tuple[str, str, int] | None:
        """(global model checkpoint, reference buffer, next round) of the run in ``resume_from``, if any."""
        if not self.resume_from:
            return None
        from fedseg.checkpoint import buffer_round, find_resume_files

        model, buffer = find_resume_files(self.resume_from)
        return model, buffer, buffer_round(buffer) + 1

    def server_config(self) -> dict:
        """The local server's ``fedseg_server.json`` for the simulator and POC (empty: the defaults)."""
        return {"checkpoint_store": os.path.abspath(self.checkpoint_store)} if self.checkpoint_store else {}

    def network(self):
        """The initial global model, seeded: the same settings start every run from the same weights."""
        return self.persistor().network()

    def persistor(self):
        """The server's persistor: it builds the initial global model from the network settings and the seed."""
        from fedseg.persistor import SeededModelPersistor

        return SeededModelPersistor(channels=list(self.channels), init_seed=self.seed)

    def to_json(self) -> dict:
        return asdict(self)


def job_fields(scope: str | None = None) -> list:
    """The fields ``JobSettings`` adds to the training settings (of one scope, if given)."""
    training = {f.name for f in fields(TrainingSettings)}
    return [f for f in fields(JobSettings) if f.name not in training and scope in (None, f.metadata["scope"])]


def server_arguments(settings: JobSettings, group: str | None = None) -> dict[str, Any]:
    """The controller keywords these settings give for their algorithm (the fields with a ``server_arg``)."""
    return {
        (f.name if f.metadata["server_arg"] is True else f.metadata["server_arg"]): getattr(settings, f.name)
        for f in job_fields()
        if f.metadata["server_arg"]
        and settings.algorithm in (f.metadata["algorithms"] or ALGORITHM_NAMES)
        and group in (None, f.metadata["group"])
    }
