"""What a round is, for every controller: who takes part, what each site reported, and the round's record.

Why one place: FedAvg, FedProx, FedOpt, FedRef and Scaffold must choose the same sites for a seed and write
the same ``round_metrics.jsonl`` lines, or the report could not compare them. A controller owns one
``RoundRecorder`` (composition) and tells it what it sent and what came back:
- ``participants``: with ``clients_per_round`` = k > 0 the k sites of a round are drawn from (seed, round)
  alone, so a run repeats and every algorithm of a seed sees the same sequence of sites;
- the sites left out score the same global model through a validate task (``validate_absent``), so every
  round's curve covers every site (``validation_only`` in the record; never aggregated);
- each site's metrics, the rejected updates with their reasons and the sites that did not answer;
- ``enough_updates``: min(``min_clients``, participants) accepted updates, or the global model is kept;
- with a collaborator policy or the FeTS Challenge clock (``fedseg.challenge_rounds.RoundPlan``, in ``plan``),
  who trains and the round's simulated seconds (``simulated_seconds``, ``simulated_total_seconds``).
The recorder reads the job's settings from its controller when it needs them (they are the controller's
constructor arguments, which FLARE exports from its attributes) and logs through it.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants

from fedseg.aggregation import CLIENT_NAME_KEY
from fedseg.wire import RECEIVED_WIRE_BYTES_KEY, WIRE_BYTES_KEY, payload_bytes

# what FLARE's model controller adds to a result after it arrives: "props" is the server's own copy of the
# task's meta (for Scaffold, the global controls it sent), so it never crossed the wire
SERVER_SIDE_META = ("props",)


def _plain(value: Any) -> Any:
    """JSON-safe scalar (NaN/Inf become None so that the file stays valid JSON)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value if isinstance(value, (str, bool)) or value is None else str(value)
    return number if math.isfinite(number) else None


def message_bytes(model: FLModel | None) -> int:
    """Bytes of a message's tensors: its parameters and any tensor dicts in its meta (Scaffold's controls)."""
    if model is None:
        return 0
    extra = sum(
        payload_bytes(v) for k, v in (model.meta or {}).items() if isinstance(v, dict) and k not in SERVER_SIDE_META
    )
    return payload_bytes(model.params) + extra


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


def validation_copy(model: FLModel) -> FLModel:
    """The global model as a validate task carries it (its own meta dict: FLARE adds to a task's meta)."""
    return FLModel(
        params=model.params,
        params_type=model.params_type,
        current_round=model.current_round,
        meta=dict(model.meta or {}),
    )


class RoundRecorder:
    """One controller's rounds: participation, what each site sent back, and ``round_metrics.jsonl``."""

    def __init__(self, controller) -> None:
        self.controller = controller
        self.all_sites: list[str] = []
        self.targets: list[str] = []
        self.site_records: dict[str, dict] = {}
        self.rejected: dict[str, str] = {}
        self.absent_records: dict[str, dict] = {}
        self.sent_bytes: int | None = None
        self.wire_bytes_out: int | None = None
        self.round_started = time.time()
        self.plan = None  # the controller's RoundPlan, set once its job has been checked
        self.clock_fields: dict = {}

    # -- choosing and sending ---------------------------------------------------------------------------------
    def choose(self, everyone: list[str], round_number: int) -> list[str]:
        """Every connected site, ``clients_per_round`` of them drawn from (seed, round) (see ``participants``), or
        the job's collaborator policy's; with the clock, the round is priced now (who trains sets its time). A
        continued run first replays the rounds before it, so the clock's total and last times are as they were."""
        c = self.controller
        self.all_sites = sorted(everyone)
        if self.plan is None:
            chosen = participants(everyone, c.clients_per_round, c.participation_seed, round_number)
        else:
            if self.plan.clock_on and not self.plan.rounds_priced and round_number > 0:
                self.plan.replay(self.all_sites, round_number)
            chosen = self.plan.choose(self.all_sites, round_number)
            self.clock_fields = self.plan.price(self.all_sites, chosen, round_number)
        clock = self.clock_fields.get("simulated_seconds")
        priced = f" ({clock:.0f} simulated s)" if clock is not None else ""
        c.info(f"round {round_number}: training on {', '.join(chosen)}{priced}")
        return chosen

    def start(self, targets: list, model: FLModel) -> None:
        """The training task goes out to ``targets`` with ``model``: the round's clock and bytes start here."""
        self.targets = [getattr(t, "name", t) for t in (targets or [])]
        self.sent_bytes = message_bytes(model)
        self.wire_bytes_out = None
        self.round_started = time.time()

    def absent_sites(self) -> list[str]:
        return [s for s in self.all_sites if s not in self.targets]

    def ask_absent_to_validate(self, model: FLModel, timeout: int = 0) -> None:
        """Partial participation: the sites left out of this round score the same global model (no training),
        so that a round's Dice covers every site; the round waits for them as for the trainers. Sent before the
        training task, so that FLARE's failure tolerance counts are the training task's (they are the last
        broadcast's)."""
        absent = self.absent_sites()
        if not (self.controller.validate_absent and absent):
            return
        self.controller.broadcast_model(
            data=validation_copy(model),
            task_name=AppConstants.TASK_VALIDATION,
            targets=absent,
            timeout=timeout,
            blocking=False,
            callback=self.record_absent_validation,
        )

    # -- receiving ------------------------------------------------------------------------------------------
    def record_absent_validation(self, result: FLModel) -> bool:
        site = (result.meta or {}).get(CLIENT_NAME_KEY, AppConstants.CLIENT_UNKNOWN)
        self.absent_records[site] = {k: _plain(v) for k, v in (result.metrics or {}).items()}
        return True

    def record_update(self, result: FLModel, reason: str | None) -> None:
        """A site's training result: its metrics and sizes, and why its update was rejected (logged) if it was."""
        meta = result.meta or {}
        site = meta.get(CLIENT_NAME_KEY, AppConstants.CLIENT_UNKNOWN)
        record = {k: _plain(v) for k, v in (result.metrics or {}).items()}
        record["num_steps"] = _plain(meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND))
        # with a compressing filter the sizes on the wire come from WireSizeMeter (see fedseg.wire)
        record["bytes_received_by_site"] = meta.get(RECEIVED_WIRE_BYTES_KEY) or self.sent_bytes
        record["bytes_sent_by_site"] = meta.get(WIRE_BYTES_KEY) or message_bytes(result)
        record["update_zero_fraction"] = zero_fraction(result.params)
        if meta.get(RECEIVED_WIRE_BYTES_KEY):
            self.wire_bytes_out = meta[RECEIVED_WIRE_BYTES_KEY]
        if reason:
            record["rejected"] = reason
            self.rejected[site] = reason
            self.controller.error(f"round {self.controller.current_round}: update from {site} rejected: {reason}")
        self.site_records[site] = record

    def enough_updates(self) -> bool:
        """min_clients accepted updates, or every participant's when fewer sites were asked (partial participation)."""
        accepted = [s for s in self.site_records if s not in self.rejected]
        min_clients = self.controller.min_clients
        needed = min(min_clients, len(self.targets)) if self.targets else min_clients
        return len(accepted) >= max(1, needed)

    # -- the record -----------------------------------------------------------------------------------------
    def write(self, aggregate_metrics: dict | None, nr_aggregated, applied_update: bool, extra: dict) -> None:
        """Append the round's line to ``round_metrics.jsonl`` (flushed to disk) and start the next round afresh."""
        c = self.controller
        missing = sorted(set(self.targets) - set(self.site_records))
        record = {
            "round": c.current_round,
            "algorithm": c.algorithm,
            "time": time.time(),
            "seconds": time.time() - self.round_started,
            "sites": dict(sorted(self.site_records.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "missing": missing,
            "participants": sorted(self.targets),
            "validation_only": dict(sorted(self.absent_records.items())),
            "aggregate": {k: _plain(v) for k, v in (aggregate_metrics or {}).items()},
            "nr_aggregated": nr_aggregated,
            "global_updated": applied_update,
            "bytes_sent_per_site": self.wire_bytes_out or self.sent_bytes,
            **self.clock_fields,
            **extra,
        }
        path = os.path.join(c.get_run_dir(), c.metrics_filename)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if missing:
            c.warning(f"round {c.current_round}: no result from {', '.join(missing)}")
        self.site_records, self.rejected, self.absent_records = {}, {}, {}
        c.info(f"round {c.current_round}: metrics of {len(record['sites'])} sites written to {path}")
