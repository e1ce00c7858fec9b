"""Server controllers: every algorithm records its rounds the same way and rejects bad updates the same way.

``RoundRecorder`` is mixed into NVFlare's workflows (FedAvg, FedOpt, Scaffold) and adds:
- a check of every site update before aggregation: NaN/Inf values, missing or extra keys and wrong
  shapes are rejected with the site's name and the reason, and the round goes on with the others; with
  fewer than ``min_clients`` accepted updates the global model is kept unchanged for that round;
- ``round_metrics.jsonl`` in the job's run folder: one JSON line per round with each site's metrics
  (validation of the global model it received, training loss and seconds, bytes each way), the sites
  that were rejected or missing, and the aggregate;
- tolerance of a site that stops answering: a round waits for ``min_clients`` results and then
  ``wait_after_min_seconds`` for the rest.
- partial participation: with ``clients_per_round`` = k > 0, each round trains k of the sites, drawn by
  ``participants`` from (seed, round) alone, so a run repeats and every algorithm of a seed sees the same
  sequence of sites; the round record names them (``participants``). The absent sites score the same
  global model through a validate task (``validate_absent``), so every round's curve covers every site
  (``validation_only`` in the record; their scores never enter the aggregate).
``FedRefController`` adds the MAP step of ``fedseg.fedref`` after aggregation and saves its reference
buffer with every global checkpoint; a job that names a stopped run's job id (``resume_job``) continues
it from the buffer and global model the server finds in its own checkpoint store, up to the run's total
``planned_rounds`` if it gives them, and copies that run's round records beside its own
(``resumed_from/<job id>/``) for the report. Each round it also
records the step's inputs (FedAvg model, previous global model, buffered models) in ``fedref_step.pt``,
overwritten every round, so that anyone can recompute the last global model from the closed form.

A job is data from a researcher the server does not fully trust: file names are plain names inside the
run folder (checked at construction), and every setting is checked against its type, its range and the
server's caps (``fedseg.server_config``) when the workflow starts, before any model is built or sent.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from typing import Any

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_common.workflows.scaffold import Scaffold as _Scaffold
from nvflare.app_opt.pt.fedopt_ctl import FedOpt as _FedOpt

from fedseg.atomic import atomic_path
from fedseg.checkpoint import (
    REFERENCE_BUFFER_FILE,
    RESUMED_FROM_DIR,
    ROUND_METRICS_FILE,
    find_resume_files,
    load_file,
    part_job,
    round_records,
    to_arrays,
    to_tensors,
    unpack_stored_run,
)
from fedseg.fedref import (
    DEFAULT_ALPHA_MAX,
    DEFAULT_BUFFER_SIZE,
    DEFAULT_LAMBDA1,
    DEFAULT_LAMBDA2,
    DEFAULT_VARIANT,
    VARIANTS,
    FedRefUpdater,
    ReferenceBuffer,
    is_float_tensor,
)
from fedseg.persistor import SeededModelPersistor
from fedseg.server_config import (
    MAX_BUFFER_SIZE,
    MAX_PULL,
    MAX_WAIT_SECONDS,
    JobRefused,
    ServerConfig,
    boolean,
    check_optimizer,
    check_scheduler,
    choice,
    integer,
    job_store,
    number,
    plain_name,
)
from fedseg.wire import RECEIVED_WIRE_BYTES_KEY, WIRE_BYTES_KEY, payload_bytes

FEDREF_STEP_FILE = "fedref_step.pt"  # the inputs of the last MAP step, to check it from the run's artifacts
CLIENT_NAME_KEY = "client_name"  # where FedAvg finds the sender in a result's meta (nvflare 2.9)


def _plain(value: Any) -> Any:
    """JSON-safe scalar (NaN/Inf become None so that the file stays valid JSON)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value if isinstance(value, (str, bool)) or value is None else str(value)
    return number if math.isfinite(number) else None


# what FLARE's model controller adds to a result after it arrives: "props" is the server's own copy of the
# task's meta (for Scaffold, the global controls it sent), so it never crossed the wire
SERVER_SIDE_META = ("props",)


def message_bytes(model: FLModel | None) -> int:
    """Bytes of a message's tensors: its parameters and any tensor dicts in its meta (Scaffold's controls)."""
    if model is None:
        return 0
    extra = sum(
        payload_bytes(v) for k, v in (model.meta or {}).items() if isinstance(v, dict) and k not in SERVER_SIDE_META
    )
    return payload_bytes(model.params) + extra


def participants(sites: list[str], clients_per_round: int, seed: int, round_number: int) -> list[str]:
    """The sites that train in this round, sorted: k of them drawn from (seed, round) alone, or all when k is 0 or >= K.

    Seeded by the pair (not seed + round, which would make seed s + 1 replay seed s one round later), so
    the draw does not depend on the algorithm, on earlier rounds or on the order the sites connected.
    """
    ordered = sorted(sites)
    if clients_per_round < 0:
        raise ValueError(f"clients_per_round must be >= 0, got {clients_per_round}")
    if not clients_per_round or clients_per_round >= len(ordered):
        return ordered
    return sorted(random.Random(f"participation:{seed}:{round_number}").sample(ordered, clients_per_round))


def update_problem(update: dict | None, reference: dict) -> str | None:
    """Why an update cannot be aggregated (None when it can): keys, shapes and finiteness against the global."""
    if not update:
        return "empty update (no parameters)"
    missing = [k for k in reference if k not in update]
    if missing:
        return f"{len(missing)} missing key(s), e.g. {missing[0]}"
    extra = [k for k in update if k not in reference]
    if extra:
        return f"{len(extra)} unexpected key(s), e.g. {extra[0]}"
    for name, value in update.items():
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        expected = tuple(np.shape(reference[name]))
        if tuple(array.shape) != expected:
            return f"shape of {name} is {tuple(array.shape)}, expected {expected}"
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            return f"non-finite values (NaN or Inf) in {name}"
    return None


def zero_fraction(update: dict | None) -> float | None:
    """Share of exactly-zero values in an update: what a site's sparsifying privacy filter left out."""
    if not update:
        return None
    zeros = total = 0
    for value in update.values():
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        zeros += int(array.size - np.count_nonzero(array))
        total += int(array.size)
    return zeros / total if total else None


class RoundRecorder:
    """Mixin for NVFlare model controllers: update checks, round records, tolerance of silent sites."""

    algorithm = "?"

    def _init_recorder(
        self,
        min_clients: int,
        wait_after_min_seconds: int,
        metrics_filename: str,
        clients_per_round: int = 0,
        participation_seed: int = 0,
        validate_absent: bool = True,
    ) -> None:
        self.min_clients = min_clients
        self.validate_absent = validate_absent
        self._all_sites: list[str] = []
        self._absent_records: dict[str, dict] = {}
        self.clients_per_round = clients_per_round
        self.participation_seed = participation_seed
        self.wait_after_min_seconds = wait_after_min_seconds
        self.metrics_filename = plain_name("metrics_filename", metrics_filename)
        self._site_records: dict[str, dict] = {}
        self._rejected: dict[str, str] = {}
        self._targets: list[str] = []
        self._reference_params: dict = {}
        self._round_started = time.time()

    # -- where files go --------------------------------------------------------------------------
    def run_dir(self) -> str:
        return self.engine.get_workspace().get_run_dir(self.fl_ctx.get_job_id())

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
        boolean("validate_absent", self.validate_absent)
        integer("memory_gc_rounds", self.memory_gc_rounds, 0, None)
        self.check_start_round()
        if not isinstance(self.persistor, SeededModelPersistor):
            raise JobRefused(
                f"persistor_id = {getattr(self, '_persistor_id', None)!r}: must name a fedseg.persistor."
                f"SeededModelPersistor component (the server builds the initial model), found {type(self.persistor).__name__}"
            )
        config.check_network(self.persistor.channels)

    def check_start_round(self) -> None:
        if self.start_round != 0:
            raise JobRefused(
                f"start_round = {self.start_round!r}: a job starts at round 0; a FedRef job continues a stopped run "
                "with resume_job (the server takes the round from that run)"
            )

    # -- choosing: which sites train this round -----------------------------------------------------
    def sample_clients(self, num_clients=None) -> list[str]:
        """Every connected site, or ``clients_per_round`` of them drawn from (seed, round) (see ``participants``)."""
        everyone = super().sample_clients(None)
        self._all_sites = sorted(everyone)
        chosen = participants(everyone, self.clients_per_round, self.participation_seed, self.current_round)
        self.info(f"round {self.current_round}: training on {', '.join(chosen)}")
        return chosen

    # -- sending: remember what went out, and do not wait forever for a silent site ----------------
    def broadcast_model(
        self,
        data=None,
        task_name=AppConstants.TASK_TRAIN,
        targets=None,
        min_responses=None,
        timeout=0,
        wait_time_after_min_received=0,
        blocking=True,
        callback=None,
    ):
        if task_name == getattr(self, "task_name", AppConstants.TASK_TRAIN) and isinstance(data, FLModel):
            self._targets = [getattr(t, "name", t) for t in (targets or [])]
            self._reference_params = data.params or {}
            self._sent_bytes = message_bytes(data)
            self._wire_bytes_out = None
            self._round_started = time.time()
            if min_responses is None and self.min_clients and self._targets:
                min_responses = min(self.min_clients, len(self._targets))
                wait_time_after_min_received = wait_time_after_min_received or self.wait_after_min_seconds
        sent = super().broadcast_model(
            data=data,
            task_name=task_name,
            targets=targets,
            min_responses=min_responses,
            timeout=timeout,
            wait_time_after_min_received=wait_time_after_min_received,
            blocking=blocking,
            callback=callback,
        )
        if (
            task_name == getattr(self, "task_name", AppConstants.TASK_TRAIN)
            and isinstance(data, FLModel)
            and not blocking
        ):
            self.validate_on_absent_sites(data, timeout)
        return sent

    def validate_on_absent_sites(self, model: FLModel, timeout: int) -> None:
        """Partial participation: the sites left out of this round score the same global model (no training),
        so that a round's Dice covers every site; the round waits for them as for the trainers."""
        absent = [s for s in self._all_sites if s not in self._targets]
        if not (self.validate_absent and absent):
            return
        # FLARE keeps the last broadcast's failure-tolerance counts on the controller: keep the training task's
        kept = {
            k: getattr(self, k)
            for k in ("_current_min_responses", "_current_num_targets", "_current_failed_clients")
            if hasattr(self, k)
        }
        super().broadcast_model(
            data=FLModel(
                params=model.params,
                params_type=model.params_type,
                current_round=model.current_round,
                meta=dict(model.meta or {}),
            ),
            task_name=AppConstants.TASK_VALIDATION,
            targets=absent,
            timeout=timeout,
            blocking=False,
            callback=self.record_absent_validation,
        )
        for name, value in kept.items():
            setattr(self, name, value)

    def record_absent_validation(self, result: FLModel) -> bool:
        site = (result.meta or {}).get(CLIENT_NAME_KEY, AppConstants.CLIENT_UNKNOWN)
        self._absent_records[site] = {k: _plain(v) for k, v in (result.metrics or {}).items()}
        return True

    def send_model(
        self, task_name=AppConstants.TASK_TRAIN, data=None, targets=None, min_responses=None, timeout=0, callback=None
    ):
        # ModelController.send_model calls its base class directly; route through broadcast_model above
        return self.broadcast_model(
            data=data,
            task_name=task_name,
            targets=targets,
            min_responses=min_responses,
            timeout=timeout,
            blocking=False,
            callback=callback,
        )

    def send_model_and_wait(
        self, task_name=AppConstants.TASK_TRAIN, data=None, targets=None, min_responses=None, timeout=0
    ):
        return self.broadcast_model(
            data=data, task_name=task_name, targets=targets, min_responses=min_responses, timeout=timeout, blocking=True
        )

    # -- receiving: check and record every update --------------------------------------------------
    def accept_update(self, result: FLModel) -> bool:
        """Record the site's metrics; False (with a logged reason) when its update must not be aggregated."""
        meta = result.meta or {}
        site = meta.get(CLIENT_NAME_KEY, AppConstants.CLIENT_UNKNOWN)
        record = {k: _plain(v) for k, v in (result.metrics or {}).items()}
        record["num_steps"] = _plain(meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND))
        # with a compressing filter the sizes on the wire come from WireSizeMeter (see fedseg.wire)
        record["bytes_received_by_site"] = meta.get(RECEIVED_WIRE_BYTES_KEY) or getattr(self, "_sent_bytes", None)
        record["bytes_sent_by_site"] = meta.get(WIRE_BYTES_KEY) or message_bytes(result)
        record["update_zero_fraction"] = zero_fraction(result.params)
        if meta.get(RECEIVED_WIRE_BYTES_KEY):
            self._wire_bytes_out = meta[RECEIVED_WIRE_BYTES_KEY]
        reason = update_problem(result.params, self._reference_params) if self._reference_params else None
        if reason:
            record["rejected"] = reason
            self._rejected[site] = reason
            self.error(f"round {self.current_round}: update from {site} rejected: {reason}")
        self._site_records[site] = record
        return reason is None

    def enough_updates(self) -> bool:
        """min_clients accepted updates, or every participant's when fewer sites were asked (partial participation)."""
        accepted = [s for s in self._site_records if s not in self._rejected]
        needed = min(self.min_clients, len(self._targets)) if self._targets else self.min_clients
        return len(accepted) >= max(1, needed)

    def write_round_record(self, aggregate_metrics: dict | None, nr_aggregated, applied_update: bool) -> None:
        missing = sorted(set(self._targets) - set(self._site_records))
        record = {
            "round": self.current_round,
            "algorithm": self.algorithm,
            "time": time.time(),
            "seconds": time.time() - self._round_started,
            "sites": dict(sorted(self._site_records.items())),
            "rejected": dict(sorted(self._rejected.items())),
            "missing": missing,
            "participants": sorted(self._targets),
            "validation_only": dict(sorted(self._absent_records.items())),
            "aggregate": {k: _plain(v) for k, v in (aggregate_metrics or {}).items()},
            "nr_aggregated": nr_aggregated,
            "global_updated": applied_update,
            "bytes_sent_per_site": getattr(self, "_wire_bytes_out", None) or getattr(self, "_sent_bytes", None),
        }
        record.update(self.round_extra())
        path = os.path.join(self.run_dir(), self.metrics_filename)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if missing:
            self.warning(f"round {self.current_round}: no result from {', '.join(missing)}")
        self._site_records, self._rejected, self._absent_records = {}, {}, {}
        self.info(f"round {self.current_round}: metrics of {len(record['sites'])} sites written to {path}")

    def checkpoint_round(self, model: FLModel) -> None:
        """Save what a restart needs before the round is recorded (nothing: only FedRef resumes)."""

    def round_extra(self) -> dict:
        """Algorithm-specific fields of the round record."""
        return {}


class RecordingFedAvg(RoundRecorder, FedAvg):
    """NVFlare's FedAvg (and FedProx, through ``fedprox_mu``) with update checks and round records."""

    algorithm = "fedavg"

    def __init__(
        self,
        *args,
        min_clients: int = 1,
        wait_after_min_seconds: int = 60,
        metrics_filename: str = ROUND_METRICS_FILE,
        algorithm_name: str | None = None,
        clients_per_round: int = 0,
        participation_seed: int = 0,
        validate_absent: bool = True,
        **kwargs,
    ) -> None:
        if kwargs.get("model") is not None:
            raise JobRefused(
                "model: a job may not give the initial weights; the server's persistor builds them from the seed"
            )
        if kwargs.get("save_filename") is not None:
            plain_name("save_filename", kwargs["save_filename"])
        super().__init__(*args, **kwargs)
        self._init_recorder(
            min_clients,
            wait_after_min_seconds,
            metrics_filename,
            clients_per_round,
            participation_seed,
            validate_absent,
        )
        self._accepted_results: dict[str, FLModel] = {}
        self.algorithm_name = algorithm_name
        if algorithm_name:
            self.algorithm = algorithm_name

    def effective_algorithm(self) -> str:
        return "fedprox" if self.fedprox_mu else "fedavg"

    def check_job(self, config: ServerConfig) -> None:
        algorithm = self.effective_algorithm()
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

    def _aggregate_one_result(self, result: FLModel) -> bool:
        # held until the round's results are in, then summed in site order (_get_aggregated_result):
        # floating-point sums depend on their order, and arrival order changes from run to run
        if not self.accept_update(result):
            return False
        self._accepted_results[(result.meta or {}).get(CLIENT_NAME_KEY, "")] = result
        return True

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        previous_global = dict(model.params)  # FedAvg replaces the values, it does not mutate them
        applied = self.enough_updates()
        if applied:
            model = super().update_model(model, aggr_result)
            model = self.refine_global_model(model, previous_global)
            # Republish: the persistor and the best-model logic read the global model from the FL context
            # (FedOpt's update does not set it, and FedRef changes it after aggregation).
            self.fl_ctx.set_prop(
                AppConstants.GLOBAL_MODEL,
                make_model_learnable(weights=model.params, meta_props=model.meta),
                private=True,
                sticky=True,
            )
        else:
            self.error(
                f"round {self.current_round}: fewer than {self.min_clients} acceptable updates; "
                "the global model is kept unchanged"
            )
        self.checkpoint_round(model)
        self.write_round_record(
            (aggr_result.metrics if aggr_result else None),
            (aggr_result.meta or {}).get("nr_aggregated") if aggr_result else 0,
            applied,
        )
        return model

    def _get_aggregated_result(self) -> FLModel:
        accepted, self._accepted_results = self._accepted_results, {}
        self.remember_site_models(accepted)
        for site in sorted(accepted):
            super()._aggregate_one_result(accepted[site])
        if not self.enough_updates() and not self.aggregator:
            return FLModel(params={}, meta={"nr_aggregated": 0})
        return super()._get_aggregated_result()

    def refine_global_model(self, model: FLModel, previous_global: dict) -> FLModel:
        """Server-side step after aggregation (none for FedAvg)."""
        return model

    def remember_site_models(self, accepted: dict[str, FLModel]) -> None:
        """The round's accepted site updates before they are summed (FedRef's diagonal prior needs them)."""

    def aggregation_weight(self, site: str, result: FLModel) -> float:
        """The weight FLARE's FedAvg gives a site: its aggregation weight x the steps it took this round."""
        steps = (result.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND) or 1.0
        return float((self.aggregation_weights or {}).get(site, 1.0)) * float(steps)


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
        self._applied = False
        self._site_models: list[tuple[float, dict]] = []

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
        if self.fedprox_mu:
            raise JobRefused(f"fedprox_mu = {self.fedprox_mu!r}: only the fedprox controller sends a proximal term")
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
        the persistor, weights only) and its next round."""
        workspace = self.engine.get_workspace()
        store = os.path.realpath(config.store(workspace.get_root_dir()))
        folder = os.path.join(store, self.resume_job)
        real = os.path.realpath(folder)
        if self.resume_job == self.fl_ctx.get_job_id() or os.path.islink(folder) or os.path.dirname(real) != store:
            raise JobRefused(f"resume_job = {self.resume_job!r}: not a run folder of the server's checkpoint store")
        if not os.path.isdir(real):
            real = self.unpack_finished_run(workspace)
        try:
            model, buffer = find_resume_files(real)
        except FileNotFoundError:
            raise JobRefused(
                f"resume_job = {self.resume_job!r}: that run left no {REFERENCE_BUFFER_FILE} with a global model"
            ) from None
        self.load_reference_buffer(buffer)
        next_round = self._resumed_round + 1
        if self.start_round not in (0, next_round):
            raise JobRefused(
                f"start_round = {self.start_round!r}: run {self.resume_job} continues at round {next_round}"
            )
        if self.planned_rounds is not None:
            if self.planned_rounds <= next_round:
                raise JobRefused(
                    f"planned_rounds = {self.planned_rounds!r}: run {self.resume_job} already did {next_round} of "
                    f"the {self.planned_rounds} planned rounds"
                )
            self.num_rounds = self.planned_rounds - next_round
        self.start_round = next_round
        self.persistor.start_from(model)
        self.keep_earlier_records(real)
        self.info(
            f"continuing run {self.resume_job} at round {next_round} from {os.path.relpath(buffer, store)}; "
            f"{self.num_rounds} round(s) to run"
            + (f" of the {self.planned_rounds} planned" if self.planned_rounds is not None else "")
        )

    def keep_earlier_records(self, stopped: str) -> None:
        """The stopped run's round records beside this run's, ``resumed_from/<job id>/round_metrics.jsonl`` (its
        own file, the shortest path, as the report finds it) with those of the runs it continued in turn, so that
        this run's report covers every part. A run unpacked from the job store has them there already."""
        target = os.path.join(self.run_dir(), RESUMED_FROM_DIR, self.resume_job)
        found = round_records(stopped)
        if not found or os.path.realpath(stopped) == os.path.realpath(target):
            return
        own = os.path.join(target, ROUND_METRICS_FILE)
        copies = {}
        for path in found:
            relative = os.path.relpath(path, stopped)
            if part_job(relative):  # a part before it: .../resumed_from/<id>/round_metrics.jsonl
                copies[path] = os.path.join(target, relative)
            elif own not in copies.values() and RESUMED_FROM_DIR not in relative.split(os.sep):
                copies[path] = own  # its own: the shortest path outside resumed_from/
        try:
            for source, destination in copies.items():
                with atomic_path(destination) as tmp:
                    shutil.copyfile(source, tmp)
        except OSError as exc:  # the records are for the report: the run goes on without them
            self.warning(f"round records of run {self.resume_job} not copied: {exc}")

    def unpack_finished_run(self, workspace) -> str:
        """A finished job's checkpoints and round records, from the workspace FLARE saved in its job store (the run
        folder is gone), unpacked into this run's folder; JobRefused when the store holds no such job."""
        from nvflare.app_common.storages.filesystem_storage import FilesystemStorage

        root = job_store(workspace.get_site_config_dir())
        try:
            found = root and os.path.isdir(root)
            saved = FilesystemStorage(root_dir=root).get_data(self.resume_job, "workspace") if found else None
        except Exception:  # FLARE's StorageException: no such job, or it left no workspace
            saved = None
        if saved is None:
            raise JobRefused(
                f"resume_job = {self.resume_job!r}: no such run in the server's checkpoint store or job store"
            )
        return unpack_stored_run(saved, os.path.join(self.run_dir(), RESUMED_FROM_DIR, self.resume_job))

    def load_reference_buffer(self, path: str) -> None:
        """A saved buffer (weights only) into the updater; its capacity must be this job's p."""
        state = load_file(path)
        if not isinstance(state, dict) or "capacity" not in state or "models" not in state:
            raise JobRefused(f"{os.path.basename(path)} of run {self.resume_job}: not a FedRef reference buffer")
        state = to_arrays(state)
        buffer = ReferenceBuffer.from_state(state)
        if buffer.capacity != self.buffer_size:
            raise JobRefused(
                f"buffer_size = {self.buffer_size!r}: run {self.resume_job} saved a buffer of size {buffer.capacity}"
            )
        self.updater.buffer = buffer
        self.updater.velocity = state.get("velocity")
        self._resumed_round = int(state.get("round", -1))

    def lambda2_at(self, round_number: int) -> float:
        """lambda2 of this round under the optional schedule."""
        if not self.lambda2_every or self.lambda2_factor == 1.0:
            return self.lambda2
        value = self.lambda2 * self.lambda2_factor ** (round_number // self.lambda2_every)
        return min(value, self.lambda2_max) if self.lambda2_max is not None else value

    def refine_global_model(self, model: FLModel, previous_global: dict) -> FLModel:
        self.updater.lambda2 = self.lambda2_at(self.current_round)
        self.updater.start(previous_global)
        averaged, buffered = model.params, self.updater.buffer.models
        model.params, self._applied = self.updater.update(model.params, previous_global, self._site_models)
        self._site_models = []
        self.save_step_record(averaged, previous_global, buffered)
        return model

    def save_step_record(self, averaged: dict, previous_global: dict, buffered: list[dict]) -> None:
        """Write this round's MAP step inputs (atomically, replacing the last round's): with the saved global
        model they show that the step is the closed form of ``fedseg.fedref`` for this variant."""
        import torch

        def floats(params: dict) -> dict:
            return {k: v for k, v in params.items() if is_float_tensor(v)}

        record = {
            "round": self.current_round,
            "applied": self._applied,
            "lambda1": self.updater.lambda1,
            "lambda2": self.updater.lambda2,
            "reference_weighting": self.reference_weighting,
            "variant": self.variant,
            "momentum": self.momentum,
            "averaged": floats(averaged),
            "previous_global": floats(previous_global),
            "buffer": buffered,
        }
        with atomic_path(os.path.join(self.run_dir(), FEDREF_STEP_FILE)) as tmp:
            torch.save(to_tensors(record), tmp)

    def remember_site_models(self, accepted: dict[str, FLModel]) -> None:
        if self.variant == "diagonal":  # the others need only the average: hold no extra copies
            self._site_models = [(self.aggregation_weight(site, r), r.params) for site, r in sorted(accepted.items())]

    def checkpoint_round(self, model: FLModel) -> None:
        """A round is done once its checkpoint is on disk: the global model and the buffer are saved before the
        round record is written, so a server killed at any moment leaves a run that resumes from its last
        recorded round (or from the one after it, if the kill fell between the buffer and the record)."""
        if not self.stop_condition:  # with a stop condition FLARE's FedAvg saves only the best model; keep that
            super().save_model(model)
            self._checkpointed_round = self.current_round
        self.save_reference_buffer()

    def save_model(self, model: FLModel) -> None:
        if getattr(self, "_checkpointed_round", None) != self.current_round:
            super().save_model(model)

    def round_extra(self) -> dict:
        return {
            "fedref": {
                "applied": self._applied,
                "buffer": len(self.updater.buffer),
                "p": self.buffer_size,
                "lambda1": self.lambda1,
                "lambda2": self.updater.lambda2,
                "reference_weighting": self.reference_weighting,
                "variant": self.variant,
                "momentum": self.momentum,
                "step_ratio": _plain(self.updater.last_step_ratio),
                "alpha_mean": _plain(np.mean(list(self.updater.last_shares.values())))
                if self.updater.last_shares
                else None,
            }
        }

    def save_reference_buffer(self) -> None:
        """Write the buffer atomically next to the run's checkpoints (a restart can resume from it)."""
        import torch

        state = self.updater.buffer.state()
        state["round"] = self.current_round
        state["velocity"] = self.updater.velocity
        with atomic_path(os.path.join(self.run_dir(), REFERENCE_BUFFER_FILE)) as tmp:
            torch.save(to_tensors(state), tmp)


class RecordingFedOpt(RecordingFedAvg, _FedOpt):
    """NVFlare's FedOpt (server-side optimiser on the averaged update: FedAdam, FedAvgM) with our records.

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
        if self.fedprox_mu:
            raise JobRefused(f"fedprox_mu = {self.fedprox_mu!r}: only the fedprox controller sends a proximal term")
        check_optimizer(self.optimizer_args)
        check_scheduler(self.lr_scheduler_args)
        super().check_job(config)

    def run(self) -> None:
        import torch

        self.device = torch.device(self.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
        self.source_model = self.persistor.network()
        super().run()


def _scalar_meta(meta: dict | None) -> dict:
    """The plain values of a model's meta (tensor dicts such as Scaffold's controls left out)."""
    return {k: v for k, v in (meta or {}).items() if isinstance(v, (str, int, float, bool, type(None)))}


class RecordingScaffold(RoundRecorder, _Scaffold):
    """NVFlare's Scaffold controller (control variates) with update checks and round records."""

    algorithm = "scaffold"

    def __init__(
        self,
        *args,
        min_clients: int = 1,
        wait_after_min_seconds: int = 60,
        metrics_filename: str = ROUND_METRICS_FILE,
        clients_per_round: int = 0,
        participation_seed: int = 0,
        **kwargs,
    ) -> None:
        if kwargs.get("model") is not None:
            raise JobRefused(
                "model: a job may not give the initial weights; the server's persistor builds them from the seed"
            )
        super().__init__(*args, **kwargs)
        # Scaffold sends its training task blocking: absent sites are not asked to validate
        self._init_recorder(
            min_clients,
            wait_after_min_seconds,
            metrics_filename,
            clients_per_round,
            participation_seed,
            validate_absent=False,
        )
        self.task_name = AppConstants.TASK_TRAIN

    def aggregate(self, results, aggregate_fn=None):
        accepted = [r for r in results if self.accept_update(r)]
        accepted.sort(key=lambda r: (r.meta or {}).get(CLIENT_NAME_KEY, ""))  # order-independent sums, as in FedAvg
        if not self.enough_updates():
            from nvflare.app_common.app_constant import AlgorithmConstants

            return FLModel(params={}, meta={"nr_aggregated": 0, AlgorithmConstants.SCAFFOLD_CTRL_DIFF: {}})
        return super().aggregate(accepted, aggregate_fn=aggregate_fn)

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        applied = self.enough_updates()
        if applied:
            model = super().update_model(model, aggr_result)
            # the best-model checkpoint is written from this: keep the control variates out of it
            self.fl_ctx.set_prop(
                AppConstants.GLOBAL_MODEL,
                make_model_learnable(weights=model.params, meta_props=_scalar_meta(model.meta)),
                private=True,
                sticky=True,
            )
        else:
            self.error(
                f"round {self.current_round}: fewer than {self.min_clients} acceptable updates; "
                "the global model is kept unchanged"
            )
        self.checkpoint_round(model)
        self.write_round_record(aggr_result.metrics, (aggr_result.meta or {}).get("nr_aggregated"), applied)
        return model

    def save_model(self, model: FLModel) -> None:
        """Persist the weights without the control variates and their deltas (numpy arrays in the meta would
        make the checkpoint unreadable to torch.load(weights_only=True), e.g. for cross-site evaluation)."""
        meta = _scalar_meta(model.meta)
        super().save_model(
            FLModel(params=model.params, params_type=model.params_type, meta=meta, current_round=model.current_round)
        )
