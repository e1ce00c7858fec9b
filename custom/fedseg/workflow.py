"""What every FedSeg controller adds to an NVFlare workflow: our job arguments, their checks, and the round's I/O.

Why a base class: FedAvg, FedProx, FedOpt, FedRef and Scaffold take the same extra arguments, and FLARE
exports a job from the constructor's named arguments and the attributes of the same names, so they are
defined once, here, as named arguments (``validate_absent`` belongs to the FedAvg family only: Scaffold sends
its training task blocking). A job is data from a researcher the server does not fully trust: file names
are plain names inside the run folder (checked at construction), and every setting is checked against
its type, its range and the server's caps (``fedseg.server_config``) when the workflow starts, before any
model is sent. The rest is composed: ``self.rounds`` (``fedseg.rounds.RoundRecorder``) and
``self.site_aggregator`` (``fedseg.aggregation.SiteOrderedAggregator``).
"""

from __future__ import annotations

import time

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fedprox_utils import set_fedprox_metadata
from nvflare.fuel.utils.log_utils import center_message
from nvflare.fuel.utils.memory_utils import cleanup_memory

from fedseg.aggregation import SiteOrderedAggregator, site_name
from fedseg.challenge_rounds import RoundPlan, check_plan
from fedseg.checkpoint import ROUND_METRICS_FILE
from fedseg.fets_challenge import WEEK_SECONDS
from fedseg.persistor import SeededModelPersistor
from fedseg.rounds import RoundRecorder
from fedseg.server_config import (
    MAX_WAIT_SECONDS,
    JobRefused,
    ServerConfig,
    boolean,
    integer,
    plain_name,
)

TASK_CHECK_PERIOD = 0.5  # BaseModelController's default task_check_period (nvflare 2.9)


def scalar_meta(meta: dict | None) -> dict:
    """The plain values of a model's meta (tensor dicts such as Scaffold's controls left out)."""
    return {k: v for k, v in (meta or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}


class FedSegWorkflow:
    """Base of our controllers (before NVFlare's workflow in the MRO): arguments, checks, sampling, the training task.

    Args:
        min_clients: accepted updates a round needs to change the global model (at most the participants),
            and the results a round waits for before ``wait_after_min_seconds`` for the rest.
        wait_after_min_seconds: how long a round waits for the other sites once ``min_clients`` answered.
        metrics_filename: the round records' file in the run folder (a plain name).
        clients_per_round: k > 0 sites train each round, drawn from (``participation_seed``, round); 0: all.
        participation_seed: the seed of that draw (the job's seed).
        selection_policy: the FeTS Challenge's collaborator policy instead (``all``, ``random:K``, ``largest:K``,
            ``drop_slow:N``; ``fedseg.challenge_rounds``); empty: ``clients_per_round``.
        clock_cases: site -> [training, validation] cases the FeTS Challenge clock prices each round with; the
            round records then carry simulated seconds. None: no clock.
        time_budget_seconds: with the clock, the run stops once the simulated time exceeds this (a week).
    """

    algorithm = "?"

    def __init__(
        self,
        *args,
        min_clients: int = 1,
        wait_after_min_seconds: int = 60,
        metrics_filename: str = ROUND_METRICS_FILE,
        clients_per_round: int = 0,
        participation_seed: int = 0,
        selection_policy: str = "",
        clock_cases: dict | None = None,
        time_budget_seconds: int = WEEK_SECONDS,
        **kwargs,
    ) -> None:
        if kwargs.get("model") is not None:
            raise JobRefused(
                "model: a job may not give the initial weights; the server's persistor builds them from the seed"
            )
        self.check_names(kwargs)
        super().__init__(*args, **kwargs)
        self.min_clients = min_clients
        self.wait_after_min_seconds = wait_after_min_seconds
        self.metrics_filename = plain_name("metrics_filename", metrics_filename)
        self.clients_per_round = clients_per_round
        self.participation_seed = participation_seed
        self.selection_policy = selection_policy
        self.clock_cases = clock_cases
        self.time_budget_seconds = time_budget_seconds
        # our own copies of two BaseModelController arguments it keeps private (the refusal names one, the
        # wait loop sleeps the other)
        self.persistor_id = kwargs.get("persistor_id", AppConstants.DEFAULT_PERSISTOR_ID)
        self.task_check_period = kwargs.get("task_check_period", TASK_CHECK_PERIOD)
        self.rounds = RoundRecorder(self)
        self.site_aggregator = self.make_aggregator()

    def check_names(self, kwargs: dict) -> None:
        """Refuse a path where a job gives a file name, before the workflow is built."""

    def make_aggregator(self) -> SiteOrderedAggregator:
        """The round's update checks and sums (a new aggregation rule: a subclass of SiteOrderedAggregator)."""
        return SiteOrderedAggregator()

    # -- what the server allows: checked when the workflow starts, before any model is built or sent ----------
    def start_controller(self, fl_ctx) -> None:
        super().start_controller(fl_ctx)
        self.server_config = ServerConfig.for_workspace(self.engine.get_workspace())
        self.check_job(self.server_config)

    def effective_algorithm(self) -> str:
        """The algorithm this controller runs, from its class and settings (never from a name the job gives)."""
        return self.algorithm

    def check_job(self, config: ServerConfig) -> None:
        """Refuse (JobRefused, one line) any setting outside its type, range or the server's caps."""
        config.check_algorithm(self.effective_algorithm())
        config.check_rounds(self.num_rounds)
        integer("num_clients", self.num_clients, 1, 100000)
        integer("min_clients", self.min_clients, 1, None)
        integer("clients_per_round", self.clients_per_round, 0, None)
        integer("wait_after_min_seconds", self.wait_after_min_seconds, 0, MAX_WAIT_SECONDS)
        integer("participation_seed", self.participation_seed, None, None)
        check_plan(self.selection_policy, self.clients_per_round, self.clock_cases, self.time_budget_seconds)
        self.rounds.plan = RoundPlan(
            self.selection_policy,
            self.clients_per_round,
            self.participation_seed,
            self.clock_cases,
            self.time_budget_seconds,
        )
        boolean("validate_absent", self.validate_absent)
        integer("memory_gc_rounds", self.memory_gc_rounds, 0, None)
        if boolean("enable_tensor_disk_offload", self.enable_tensor_disk_offload):
            raise JobRefused(
                "enable_tensor_disk_offload = True: the server checks every update's tensors in memory before it "
                "sums them (fedseg.aggregation); FLARE's disk-backed tensors are not checked"
            )
        self.check_start_round()
        if not isinstance(self.persistor, SeededModelPersistor):
            raise JobRefused(
                f"persistor_id = {self.persistor_id!r}: must name a fedseg.persistor."
                f"SeededModelPersistor component (the server builds the initial model), found {type(self.persistor).__name__}"
            )
        config.check_network(self.persistor.channels)

    def check_start_round(self) -> None:
        if self.start_round != 0:
            raise JobRefused(
                f"start_round = {self.start_round!r}: a job starts at round 0; a FedRef job continues a stopped run "
                "with resume_job (the server takes the round from that run)"
            )

    # -- a round: choose, send, receive ---------------------------------------------------------------------------
    def sample_clients(self, num_clients=None) -> list[str]:
        """Every connected site, or ``clients_per_round`` of them drawn from (seed, round) (``fedseg.rounds``)."""
        return self.rounds.choose(super().sample_clients(None), self.current_round)

    def start_training_round(self, targets, model: FLModel) -> None:
        """The training task is about to go out: its updates are checked against ``model``, the round recorded."""
        self.site_aggregator.start_round(model.params, self.current_round)
        self.rounds.start(targets, model)

    def send_training(self, model: FLModel, targets, blocking: bool, callback=None, task_name=None, timeout=0):
        """The training task, through FLARE's public broadcast: the round waits for min(min_clients, targets)
        results, then ``wait_after_min_seconds`` for the rest, so that a silent site does not stop the run."""
        names = self.rounds.targets
        return self.broadcast_model(
            data=model,
            task_name=task_name or self.task_name,
            targets=targets,
            min_responses=min(self.min_clients, len(names)) if names else None,
            timeout=timeout,
            wait_time_after_min_received=self.wait_after_min_seconds if names else 0,
            blocking=blocking,
            callback=callback,
        )

    def receive_update(self, result: FLModel) -> bool:
        """A site's training result: checked and held by the aggregator, recorded (False: not aggregated)."""
        accepted = self.site_aggregator.accept_model(result)
        self.rounds.record_update(result, None if accepted else self.site_aggregator.rejected.get(site_name(result)))
        return accepted

    # -- the global model ---------------------------------------------------------------------------------------
    def publish_global_model(self, model: FLModel, meta: dict | None) -> None:
        """The global model into the FL context, where the persistor and the best-model logic read it."""
        self.fl_ctx.set_prop(
            AppConstants.GLOBAL_MODEL,
            make_model_learnable(weights=model.params, meta_props=meta),
            private=True,
            sticky=True,
        )

    def keep_global_model(self) -> None:
        self.error(
            f"round {self.current_round}: fewer than {self.min_clients} acceptable updates; "
            "the global model is kept unchanged"
        )


class FedAvgRounds(FedSegWorkflow):
    """FedAvg's round loop (nvflare 2.9 ``FedAvg.run``) from NVFlare's public controller calls, for the FedAvg
    family (FedAvg, FedProx, FedOpt, FedRef): our checks and records need no private NVFlare method.

    A round ends in ``finish_round``: update (with enough accepted updates), ``refine_global_model`` (FedRef),
    republish the global model, save it (and what ``save_round_state`` adds), then write the round record.
    ``finish_round`` calls ``self.update_model``: FedAvg's, or FedOpt's, which comes first in
    ``RecordingFedOpt``'s MRO.
    """

    # -- the round loop ----------------------------------------------------------------------------------------
    def run(self) -> None:
        self.info(center_message("Start FedAvg."))
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        model = self.load_model()
        model.start_round, model.total_rounds = self.start_round, self.num_rounds
        for round_number in range(self.start_round, self.start_round + self.num_rounds):
            self.current_round = round_number
            self.info(center_message(message=f"Round {self.current_round} started.", boarder_str="-"))
            model.current_round = self.current_round
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, self.current_round, private=True, sticky=False)
            self.event(AppEventType.ROUND_STARTED)
            self.send_round(model, self.sample_clients(self.num_clients))
            if not self.wait_for_results():
                self.info("Abort signal triggered. Finishing FedAvg.")
                return
            self.event(AppEventType.BEFORE_AGGREGATION)
            result = self.aggregate_round()
            self.fire_event_with_data(
                AppEventType.AFTER_AGGREGATION, self.fl_ctx, AppConstants.AGGREGATION_RESULT, result
            )
            model = self.finish_round(model, result)
            if self.stop_condition and self.keep_best_or_stop(model):
                break
            if self.rounds.plan is not None and self.rounds.plan.spent:
                self.info(
                    f"round {self.current_round}: the simulated clock is past the time budget "
                    f"({self.rounds.plan.total_seconds:.0f} s > {self.time_budget_seconds} s); the run ends here"
                )
                break
            self.clean_memory()
        self.info(center_message("Finished FedAvg."))

    def send_round(self, model: FLModel, clients: list[str]) -> None:
        """The validate task to the sites left out first, then the training task (FLARE's failure tolerance
        counts are the last broadcast's: they must be the training task's), both without blocking."""
        set_fedprox_metadata(model, self.fedprox_mu)
        self.start_training_round(clients, model)
        self.rounds.ask_absent_to_validate(model)
        self.send_training(model, clients, blocking=False, callback=self.receive_update)

    def wait_for_results(self) -> bool:
        """Until every task of the round is done (False: the job was aborted)."""
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                return False
            time.sleep(self.task_check_period)
        return True

    def aggregate_round(self) -> FLModel:
        """The round's average of the accepted updates, or an empty result when too few were accepted."""
        self.remember_site_models(self.site_aggregator.accepted())
        if not self.rounds.enough_updates():
            self.site_aggregator.reset_stats()
            return FLModel(params={}, meta={"nr_aggregated": 0})
        self.info(
            f"aggregating {len(self.site_aggregator.held)} update(s) at round {self.current_round}, in site order"
        )
        result = self.site_aggregator.aggregate_model()
        self.fl_ctx.set_prop(AppConstants.AGGREGATION_STATS, self.site_aggregator.stats, private=True, sticky=False)
        return result

    def finish_round(self, model: FLModel, result: FLModel) -> FLModel:
        """Update, refine, republish and save the global model, then record the round: a round is recorded
        only once its checkpoint is on disk, so a server killed at any moment leaves a run that resumes from its
        last recorded round (or the one after it). With a stop condition only a better model is saved (in
        ``keep_best_or_stop``, as FedAvg does)."""
        previous_global = dict(model.params)  # FedAvg replaces the values, it does not mutate them
        applied = self.rounds.enough_updates()
        if applied:
            model = self.update_model(model, result)
            model = self.refine_global_model(model, previous_global)
            # the persistor and the best-model logic read the global model from the FL context (FedOpt's update
            # does not set it, and FedRef changes it after aggregation)
            self.publish_global_model(model, model.meta)
        else:
            self.keep_global_model()
        if not self.stop_condition:
            self.save_model(model)
        self.save_round_state()
        self.rounds.write(result.metrics, (result.meta or {}).get("nr_aggregated"), applied, self.round_extra())
        return model

    def keep_best_or_stop(self, model: FLModel) -> bool:
        """FedAvg's stop condition: save the model when it is the best so far; True when the run should stop."""
        self.info(f"Round {self.current_round} global metrics: {model.metrics}")
        if self.is_curr_model_better(model):
            self.info("New best model found.")
            self.save_model(model)
        elif self.patience:
            self.info(
                f"No metric improvement, num of FL rounds without improvement: {self.num_fl_rounds_without_improvement}"
            )
        if self.should_stop(model.metrics):
            self.info(f"Stopping at round={self.current_round} out of total_rounds={self.num_rounds}.")
            return True
        return False

    def clean_memory(self) -> None:
        if self.memory_gc_rounds > 0 and (self.current_round + 1) % self.memory_gc_rounds == 0:
            self.info(f"Memory cleanup at round {self.current_round + 1}")
            cleanup_memory()

    # -- what an algorithm adds ------------------------------------------------------------------------------
    def remember_site_models(self, accepted: list[FLModel]) -> None:
        """The round's accepted site updates before they are summed (FedRef's diagonal prior needs them)."""

    def refine_global_model(self, model: FLModel, previous_global: dict) -> FLModel:
        """Server-side step after aggregation (none for FedAvg)."""
        return model

    def save_round_state(self) -> None:
        """Save what a restart needs besides the global model, before the round is recorded (FedRef: its buffer)."""

    def round_extra(self) -> dict:
        """Algorithm-specific fields of the round record."""
        return {}


# Every keyword NVFlare 2.9's FedAvg takes (its own and its bases'), and what our round loop does with it, or
# why a job may not set it: tests/unit/test_nvflare_surface.py fails when FLARE adds one that is in neither.
FEDAVG_KEYWORDS = {
    "num_clients": "checked (1 to 100000); each round takes every connected site, or clients_per_round of them, "
    "or those of the selection_policy",
    "num_rounds": "the rounds of the loop; checked against the server's max_rounds",
    "start_round": "the first round: 0, or the round a FedRef continuation (resume_job) takes from its run",
    "memory_gc_rounds": "cleanup_memory after every memory_gc_rounds-th round",
    "persistor_id": "load_model and save_model go through it; it must be a SeededModelPersistor",
    "ignore_result_error": "FLARE's handling of a failed site result, inside broadcast_model",
    "allow_empty_global_weights": "FLARE's load_model",
    "task_check_period": "the sleep of the loop that waits for the round's tasks",
    "save_filename": "checked as a plain name; FedAvg's save_model uses it only without a persistor",
    "stop_cond": "with it, only a better model is saved and the run may stop early (FedAvg's rule)",
    "patience": "should_stop: rounds without improvement before stopping",
    "task_name": "the training task's name (only 'train': the sites run that task)",
    "exclude_vars": "SiteOrderedAggregator leaves these parameters out of the average",
    "aggregation_weights": "SiteOrderedAggregator.weight",
    "fedprox_mu": "set_fedprox_metadata on the model sent each round",
}
FEDAVG_KEYWORDS_REFUSED = {
    "model": "a job may not give the initial weights: the server's persistor builds them from the seed",
    "aggregator": "the server checks the updates and sums them in site order itself (SiteOrderedAggregator)",
    "enable_tensor_disk_offload": "the update checks read every tensor in memory, not FLARE's disk-backed ones",
}
