"""Server controllers: FedAvg that records every round's site metrics, and FedRef on top of it.

Both subclass NVFlare's ``FedAvg`` workflow (streaming aggregation, persistor, early stopping) and add:
- ``round_metrics.jsonl`` in the job's run folder: one JSON line per round with each site's metrics
  (the validation of the global model it received, its training loss and timings) and the aggregate;
- for FedRef, the MAP step of ``fedseg.fedref`` after aggregation, with its reference buffer saved next
  to the global checkpoint (``fedref_reference_buffer.pt``) every round.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.fedavg import FedAvg

from fedseg.fedref import FedRefUpdater

ROUND_METRICS_FILE = "round_metrics.jsonl"
CLIENT_NAME_KEY = "client_name"  # where FedAvg finds the sender in a result's meta (nvflare 2.9)
REFERENCE_BUFFER_FILE = "fedref_reference_buffer.pt"


def _plain(value: Any) -> Any:
    """JSON-safe scalar (NaN/Inf become None so that the file stays valid JSON)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value if isinstance(value, (str, bool)) or value is None else str(value)
    return number if math.isfinite(number) else None


class RecordingFedAvg(FedAvg):
    """FedAvg that writes one ``round_metrics.jsonl`` line per round (the record every report reads)."""

    algorithm = "fedavg"

    def __init__(self, *args, metrics_filename: str = ROUND_METRICS_FILE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_filename = metrics_filename
        self._site_records: dict[str, dict] = {}

    # -- where files go --------------------------------------------------------------------------
    def run_dir(self) -> str:
        return self.engine.get_workspace().get_run_dir(self.fl_ctx.get_job_id())

    # -- per-round bookkeeping -------------------------------------------------------------------
    def _aggregate_one_result(self, result: FLModel) -> bool:
        site = (result.meta or {}).get(CLIENT_NAME_KEY, AppConstants.CLIENT_UNKNOWN)
        record = {k: _plain(v) for k, v in (result.metrics or {}).items()}
        record["num_steps"] = _plain((result.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND))
        self._site_records[site] = record
        return super()._aggregate_one_result(result)

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        previous_global = dict(model.params)  # FedAvg replaces the values, it does not mutate them
        model = super().update_model(model, aggr_result)
        model = self.refine_global_model(model, previous_global)
        self.write_round_record(model, aggr_result)
        return model

    def refine_global_model(self, model: FLModel, previous_global: dict) -> FLModel:
        """Server-side step after aggregation (none for FedAvg)."""
        return model

    def round_extra(self) -> dict:
        """Algorithm-specific fields of the round record."""
        return {}

    def write_round_record(self, model: FLModel, aggr_result: FLModel) -> None:
        record = {
            "round": self.current_round,
            "algorithm": self.algorithm,
            "time": time.time(),
            "sites": dict(sorted(self._site_records.items())),
            "aggregate": {k: _plain(v) for k, v in (aggr_result.metrics or {}).items()},
            "nr_aggregated": (aggr_result.meta or {}).get("nr_aggregated"),
        }
        record.update(self.round_extra())
        path = os.path.join(self.run_dir(), self.metrics_filename)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._site_records = {}
        self.info(f"round {self.current_round}: metrics of {len(record['sites'])} sites written to {path}")


class FedRefController(RecordingFedAvg):
    """FedAvg followed by FedRef's MAP step toward a reference model of the last p global models.

    Args:
        buffer_size: p, the number of recent global models in the reference buffer.
        lambda1: weight of the proximal term to the last global model.
        lambda2: weight of the prior centred on the reference model.
        reference_weighting: ``uniform`` or ``linear`` (newer global models weigh more).
    """

    algorithm = "fedref"

    def __init__(
        self,
        *args,
        buffer_size: int = 3,
        lambda1: float = 0.1,
        lambda2: float = 0.1,
        reference_weighting: str = "uniform",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.buffer_size = buffer_size
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.reference_weighting = reference_weighting
        self.updater = FedRefUpdater(buffer_size, lambda1, lambda2, reference_weighting)
        self._applied = False

    def refine_global_model(self, model: FLModel, previous_global: dict) -> FLModel:
        self.updater.start(previous_global)
        model.params, self._applied = self.updater.update(model.params, previous_global)
        # Republish: the persistor and the best-model logic read the global model from the FL context.
        self.fl_ctx.set_prop(
            AppConstants.GLOBAL_MODEL,
            make_model_learnable(weights=model.params, meta_props=model.meta),
            private=True,
            sticky=True,
        )
        self.save_reference_buffer()
        return model

    def round_extra(self) -> dict:
        return {
            "fedref": {
                "applied": self._applied,
                "buffer": len(self.updater.buffer),
                "p": self.buffer_size,
                "lambda1": self.lambda1,
                "lambda2": self.lambda2,
                "reference_weighting": self.reference_weighting,
            }
        }

    def save_reference_buffer(self) -> None:
        """Write the buffer atomically next to the run's checkpoints (a restart can resume from it)."""
        import torch

        path = os.path.join(self.run_dir(), REFERENCE_BUFFER_FILE)
        tmp = path + ".tmp"
        torch.save(self.updater.buffer.state(), tmp)
        os.replace(tmp, path)
