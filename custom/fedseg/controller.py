"""Server controllers: every algorithm checks the updates, chooses the sites and records its rounds the same way.

The pieces, each in one place:
- ``fedseg.workflow.FedSegWorkflow``: our job arguments (one definition for every controller), their
  checks against the server's caps when the workflow starts, before any model is built or sent, and the
  training task's wait for ``min_clients`` results then ``wait_after_min_seconds`` for the rest;
- ``fedseg.workflow.FedAvgRounds``: FedAvg's round loop, from NVFlare's public controller calls, for
  FedAvg, FedProx, FedOpt and FedRef, so that the checks and records need no private NVFlare method;
- ``fedseg.aggregation.SiteOrderedAggregator``: the update checks (keys, shapes, NaN/Inf against the global
  model sent) and the average in site order, so a run repeats bit for bit;
- ``fedseg.rounds.RoundRecorder``: participation (``participants``, the validate task to the sites left
  out) and ``round_metrics.jsonl``;
- ``fedseg.fedref_run``: FedRef's checkpoints and the continuation of a stopped run (``resume_job``).
``RecordingFedPIDAvg``: FedAvg with ``fedseg.pidavg``'s weights.
``RecordingScaffold`` keeps NVFlare's own Scaffold loop and adapts it through public overrides. ``FedRefController`` adds the MAP step
of ``fedseg.fedref`` after aggregation and saves its reference buffer with every global checkpoint; it
records the step's inputs in ``fedref_step.pt`` every round, so anyone can recompute the last global model.
"""

from __future__ import annotations

import os
import re

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.workflows.base_fedavg import make_key_metric_info_from_stop_condition
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_common.workflows.scaffold import Scaffold as _Scaffold
from nvflare.app_opt.pt.fedopt_ctl import FedOpt as _FedOpt

from fedseg.aggregation import CLIENT_NAME_KEY, SiteOrderedAggregator, site_name, update_problem
from fedseg.checkpoint import REFERENCE_BUFFER_FILE, RESUMED_FROM_DIR, ROUND_METRICS_FILE
from fedseg.fedref import (
    DEFAULT_ALPHA_MAX,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_LAMBDA1,
    DEFAULT_LAMBDA2,
    DEFAULT_VARIANT,
    VARIANTS,
    FedRefUpdater,
)
from fedseg.fedref_run import (
    FEDREF_STEP_FILE,
    continued_rounds,
    keep_earlier_records,
    read_reference_buffer,
    resume_files,
    save_reference_buffer,
    save_step_record,
    stopped_run,
)
from fedseg.pidavg import ALPHA, BETA, GAMMA, WINDOW, PIDAggregator, PIDRule
from fedseg.rounds import SERVER_SIDE_META, _plain, message_bytes, participants, zero_fraction
from fedseg.server_config import (
    MAX_BUFFER_SIZE,
    MAX_PULL,
    JobRefused,
    ServerConfig,
    check_optimizer,
    check_scheduler,
    choice,
    integer,
    number,
    plain_name,
)
from fedseg.workflow import FedAvgRounds, FedSegWorkflow, scalar_meta

__all__ = [  # names other modules import from here (some defined in the modules above)
    "CLIENT_NAME_KEY",
    "FEDREF_STEP_FILE",
    "REFERENCE_BUFFER_FILE",
    "RESUMED_FROM_DIR",
    "ROUND_METRICS_FILE",
    "SERVER_SIDE_META",
    "FedRefController",
    "RecordingFedAvg",
    "RecordingFedOpt",
    "RecordingFedPIDAvg",
    "RecordingScaffold",
    "_plain",
    "message_bytes",
    "participants",
    "update_problem",
    "zero_fraction",
]


class RecordingFedAvg(FedAvgRounds, FedAvg):
    """NVFlare's FedAvg (and FedProx, through ``fedprox_mu``) with update checks and round records; its round
    loop is ``fedseg.workflow.FedAvgRounds.run``."""

    algorithm = "fedavg"

    def __init__(self, *args, algorithm_name: str | None = None, validate_absent: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.validate_absent = validate_absent
        self.algorithm_name = algorithm_name
        if algorithm_name:
            self.algorithm = algorithm_name

    def check_names(self, kwargs: dict) -> None:
        if kwargs.get("save_filename") is not None:
            plain_name("save_filename", kwargs["save_filename"])

    def make_aggregator(self) -> SiteOrderedAggregator:
        key_metric = make_key_metric_info_from_stop_condition(self.stop_cond, self.stop_condition)
        return SiteOrderedAggregator(self.exclude_vars, self.aggregation_weights, key_metric)

    def effective_algorithm(self) -> str:
        return "fedprox" if self.fedprox_mu else "fedavg"

    def check_job(self, config: ServerConfig) -> None:
        algorithm = self.effective_algorithm()
        if self.fedprox_mu and algorithm != "fedprox":  # FedRef, FedOpt and FedPIDAvg send no proximal term
            raise JobRefused(f"fedprox_mu = {self.fedprox_mu!r}: only the fedprox controller sends a proximal term")
        if self.algorithm_name is not None and self.algorithm_name != algorithm:
            raise JobRefused(f"algorithm_name = {self.algorithm_name!r}: this controller's settings run {algorithm!r}")
        super().check_job(config)
        if self.fedprox_mu is not None:
            number("fedprox_mu", self.fedprox_mu, 0.0, MAX_PULL)
        choice("task_name", self.task_name, ["train"])
        if self.aggregator is not None:
            raise JobRefused(f"aggregator = {type(self.aggregator).__name__}: the server sums the updates itself")
        if self.patience is not None:
            integer("patience", self.patience, 0, None)
        weights = self.aggregation_weights or {}
        for site, weight in weights.items():
            number(f"aggregation_weights[{site!r}]", weight, 0.0, 1e6)


class RecordingFedPIDAvg(RecordingFedAvg):
    """FedAvg's loop with FedPIDAvg's weights (``fedseg.pidavg``); each round's record holds the weights and their
    inputs per site (``fedpidavg``). The constants are checked when it is built, before its aggregator sees them."""

    algorithm = "fedpidavg"

    def __init__(self, *args, pid_alpha=ALPHA, pid_beta=BETA, pid_gamma=GAMMA, pid_window=WINDOW, **kwargs) -> None:
        self.pid_rule = PIDRule.checked(pid_alpha, pid_beta, pid_gamma, pid_window)  # make_aggregator reads it
        self.pid_alpha, self.pid_beta, self.pid_gamma, self.pid_window = pid_alpha, pid_beta, pid_gamma, pid_window
        super().__init__(*args, **kwargs)

    def make_aggregator(self) -> PIDAggregator:
        key_metric = make_key_metric_info_from_stop_condition(self.stop_cond, self.stop_condition)
        return PIDAggregator(self.pid_rule, self.exclude_vars, key_metric)

    def effective_algorithm(self) -> str:
        return "fedpidavg"

    def check_job(self, config: ServerConfig) -> None:
        if self.aggregation_weights:
            raise JobRefused("aggregation_weights: FedPIDAvg weighs each site by its data size and losses itself")
        super().check_job(config)

    def round_extra(self) -> dict:
        return {"fedpidavg": self.site_aggregator.last_round}


class FedRefController(RecordingFedAvg):
    """FedAvg followed by FedRef's MAP step toward a reference model of the last p global models.

    Args:
        buffer_size: p, the number of recent global models in the reference buffer.
        lambda1: weight of the proximal term to the last global model.
        lambda2: weight of the prior centred on the reference model.
        reference_weighting: ``uniform`` or ``linear`` (newer global models weigh more).
        lambda2_factor, lambda2_every, lambda2_max: optional schedule, lambda2 is multiplied by
            ``lambda2_factor`` every ``lambda2_every`` rounds, capped at ``lambda2_max`` (off by default).
        resume_job: the job id of a stopped FedRef run to continue: the server takes its newest reference
            buffer, the global model saved beside it and the next round from its own checkpoint store
            (``fedseg.server_config``), when the workflow starts; a job never names a file.
        planned_rounds: with ``resume_job``, the rounds the whole run is to reach: the job runs only those
            still to do (``planned_rounds`` - the next round), whatever its ``num_rounds``, so that a
            continuation can be written without knowing where the server stopped (``fedseg resume``).
        variant: the prior, ``mean`` | ``trend`` | ``diagonal`` (``fedseg.fedref.VARIANTS``).
        momentum: server momentum before the MAP pull (0: none).
        alpha_max: ``diagonal``: the largest share of the pull toward the prior centre.
    """

    algorithm = "fedref"

    def __init__(
        self,
        *args,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        lambda1: float = DEFAULT_LAMBDA1,
        lambda2: float = DEFAULT_LAMBDA2,
        reference_weighting: str = "uniform",
        lambda2_factor: float = 1.0,
        lambda2_every: int = 0,
        lambda2_max: float | None = None,
        resume_job: str | None = None,
        planned_rounds: int | None = None,
        variant: str = DEFAULT_VARIANT,
        momentum: float = 0.0,
        alpha_max: float = DEFAULT_ALPHA_MAX,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.buffer_size = buffer_size
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.reference_weighting = reference_weighting
        self.lambda2_factor = lambda2_factor
        self.lambda2_every = lambda2_every
        self.lambda2_max = lambda2_max
        self.resume_job = plain_name("resume_job", resume_job) if resume_job is not None else None
        self.planned_rounds = planned_rounds
        self.variant = variant
        self.momentum = momentum
        self.alpha_max = alpha_max
        self.check_arguments()  # before FedRefUpdater sees them: one line naming the setting, for any type
        self.updater = FedRefUpdater(buffer_size, lambda1, lambda2, reference_weighting, variant, momentum, alpha_max)
        self.applied = False
        self.site_models: list[tuple[float, dict]] = []

    def effective_algorithm(self) -> str:
        return "fedref"

    def check_arguments(self) -> None:
        """FedRef's own settings: types and ranges (a pull above MAX_PULL would all but freeze the model)."""
        integer("buffer_size", self.buffer_size, 1, MAX_BUFFER_SIZE)
        number("lambda1", self.lambda1, 0.0, MAX_PULL)
        number("lambda2", self.lambda2, 0.0, MAX_PULL)
        choice("reference_weighting", self.reference_weighting, ["uniform", "linear"])
        choice("variant", self.variant, VARIANTS)
        number("momentum", self.momentum, 0.0, 1.0, high_open=True)
        number("alpha_max", self.alpha_max, 0.0, 1.0)
        integer("lambda2_every", self.lambda2_every, 0, None)
        number("lambda2_factor", self.lambda2_factor, 0.0, MAX_PULL, low_open=True)
        if self.lambda2_max is not None:
            number("lambda2_max", self.lambda2_max, 0.0, MAX_PULL)
        elif self.lambda2_every and self.lambda2_factor > 1:
            raise JobRefused(
                f"lambda2_factor = {self.lambda2_factor!r} every {self.lambda2_every} rounds needs lambda2_max "
                f"(at most {MAX_PULL})"
            )

    def check_job(self, config: ServerConfig) -> None:
        super().check_job(config)
        if self.planned_rounds is not None:
            self.check_planned_rounds(config)
        if self.resume_job is not None:
            self.resume(config)

    def check_planned_rounds(self, config: ServerConfig) -> None:
        """The total of a continued run: an integer within the server's max_rounds, and only with resume_job."""
        integer("planned_rounds", self.planned_rounds, 1, None)
        config.cap("planned_rounds", self.planned_rounds, config.max_rounds, "max_rounds")
        if self.resume_job is None:
            raise JobRefused(
                f"planned_rounds = {self.planned_rounds!r}: only a job that continues a stopped run (resume_job) "
                "has planned rounds; a new job runs num_rounds"
            )

    def check_start_round(self) -> None:
        if self.resume_job is None:
            super().check_start_round()

    def resume(self, config: ServerConfig) -> None:
        """Continue the stopped run ``resume_job`` from the server's own store: its buffer, its global model (through
        the persistor, weights only) and its next round (``fedseg.fedref_run``)."""
        store, stopped = stopped_run(
            self.engine.get_workspace(), config, self.resume_job, self.fl_ctx.get_job_id(), self.get_run_dir()
        )
        model, buffer = resume_files(stopped, self.resume_job)
        self.updater.buffer, self.updater.velocity, resumed_round = read_reference_buffer(
            buffer, self.buffer_size, self.resume_job
        )
        self.start_round, self.num_rounds = continued_rounds(
            self.resume_job, resumed_round, self.start_round, self.num_rounds, self.planned_rounds
        )
        self.persistor.start_from(model)
        target = os.path.join(self.get_run_dir(), RESUMED_FROM_DIR, self.resume_job)
        keep_earlier_records(stopped, target, self.resume_job, self.warning)
        self.info(
            f"continuing run {self.resume_job} at round {self.start_round} from {os.path.relpath(buffer, store)}; "
            f"{self.num_rounds} round(s) to run"
            + (f" of the {self.planned_rounds} planned" if self.planned_rounds is not None else "")
        )

    def lambda2_at(self, round_number: int) -> float:
        """lambda2 of this round under the optional schedule."""
        if not self.lambda2_every or self.lambda2_factor == 1.0:
            return self.lambda2
        value = self.lambda2 * self.lambda2_factor ** (round_number // self.lambda2_every)
        return min(value, self.lambda2_max) if self.lambda2_max is not None else value

    def remember_site_models(self, accepted: list[FLModel]) -> None:
        if self.variant == "diagonal":  # the others need only the average: hold no extra copies
            weight = self.site_aggregator.weight
            self.site_models = [(weight(site_name(r), r), r.params) for r in accepted]

    def refine_global_model(self, model: FLModel, previous_global: dict) -> FLModel:
        self.updater.lambda2 = self.lambda2_at(self.current_round)
        self.updater.start(previous_global)
        averaged, buffered = model.params, self.updater.buffer.models
        model.params, self.applied = self.updater.update(model.params, previous_global, self.site_models)
        self.site_models = []
        settings = {
            "round": self.current_round,
            "applied": self.applied,
            "lambda1": self.updater.lambda1,
            "lambda2": self.updater.lambda2,
            "reference_weighting": self.reference_weighting,
            "variant": self.variant,
            "momentum": self.momentum,
        }
        save_step_record(self.get_run_dir(), settings, averaged, previous_global, buffered)
        return model

    def save_round_state(self) -> None:
        save_reference_buffer(self.get_run_dir(), self.updater, self.current_round)

    def round_extra(self) -> dict:
        shares = self.updater.last_shares
        return {
            "fedref": {
                "applied": self.applied,
                "buffer": len(self.updater.buffer),
                "p": self.buffer_size,
                "lambda1": self.lambda1,
                "lambda2": self.updater.lambda2,
                "reference_weighting": self.reference_weighting,
                "variant": self.variant,
                "momentum": self.momentum,
                "step_ratio": _plain(self.updater.last_step_ratio),
                "alpha_mean": _plain(np.mean(list(shares.values()))) if shares else None,
            }
        }


class RecordingFedOpt(_FedOpt, RecordingFedAvg):
    """NVFlare's FedOpt (server-side optimiser on the averaged update: FedAdam, FedAvgM) with our records.

    MRO: RecordingFedOpt, FedOpt, RecordingFedAvg, FedSegWorkflow, FedAvg: FedOpt's ``run`` sets up its torch
    model and optimiser and then runs our loop, and its ``update_model`` is the update ``finish_round`` applies.
    The optimiser's model is the persistor's seeded network (the initial global model), built when the run
    starts: a job names no model component, whose size the server could not check before building it.
    """

    algorithm = "fedopt"
    OPTIMIZERS = {"torch.optim.Adam": "fedadam", "torch.optim.SGD": "fedavgm"}

    def __init__(self, *args, device: str | None = None, **kwargs) -> None:
        if kwargs.get("source_model") is not None:
            raise JobRefused("source_model: a job names no model; FedOpt optimises the persistor's seeded network")
        kwargs["source_model"] = None
        if device is not None and not (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:[0-9]{1,2})?", device)):
            raise JobRefused(f"device = {device!r}: must be cpu, cuda or cuda:N")
        super().__init__(*args, device=device, **kwargs)
        self.device = device  # chosen at run time: a torch.device here would not survive job export

    def effective_algorithm(self) -> str:
        spec = self.optimizer_args if isinstance(self.optimizer_args, dict) else {}
        return self.OPTIMIZERS.get(spec.get("path"), "fedopt")

    def check_job(self, config: ServerConfig) -> None:
        check_optimizer(self.optimizer_args)
        check_scheduler(self.lr_scheduler_args)
        super().check_job(config)

    def run(self) -> None:
        import torch

        self.device = torch.device(self.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        self.source_model = self.persistor.network()
        super().run()


class RecordingScaffold(FedSegWorkflow, _Scaffold):
    """NVFlare's Scaffold controller (control variates) with update checks and round records.

    NVFlare's own loop (``Scaffold.run``: a blocking training task, the control variates) runs unchanged;
    ``send_model_and_wait``, ``aggregate``, ``update_model`` and ``save_model`` add what every controller does.
    """

    algorithm = "scaffold"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.validate_absent = False  # the training task is sent blocking: absent sites are not asked to validate
        self.task_name = AppConstants.TASK_TRAIN

    def send_model_and_wait(
        self, task_name=AppConstants.TASK_TRAIN, data=None, targets=None, min_responses=None, timeout=0
    ):
        self.start_training_round(targets, data)
        return self.send_training(data, targets, blocking=True, task_name=task_name, timeout=timeout)

    def aggregate(self, results, aggregate_fn=None):
        for result in results:
            self.receive_update(result)
        if not self.rounds.enough_updates():
            return FLModel(params={}, meta={"nr_aggregated": 0, AlgorithmConstants.SCAFFOLD_CTRL_DIFF: {}})
        return super().aggregate(self.site_aggregator.accepted(), aggregate_fn=aggregate_fn)  # in site order

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        applied = self.rounds.enough_updates()
        if applied:
            model = super().update_model(model, aggr_result)
            # the best-model checkpoint is written from this: keep the control variates out of it
            self.publish_global_model(model, scalar_meta(model.meta))
        else:
            self.keep_global_model()
        self.rounds.write(aggr_result.metrics, (aggr_result.meta or {}).get("nr_aggregated"), applied, {})
        return model

    def save_model(self, model: FLModel) -> None:
        """Persist the weights without the control variates and their deltas (numpy arrays in the meta would
        make the checkpoint unreadable to torch.load(weights_only=True), e.g. for cross-site evaluation)."""
        meta = scalar_meta(model.meta)
        super().save_model(
            FLModel(params=model.params, params_type=model.params_type, meta=meta, current_round=model.current_round)
        )
