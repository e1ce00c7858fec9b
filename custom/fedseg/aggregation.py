"""The server's update checks and its reproducible weighted average, as one FLARE ``ModelAggregator``.

Why our own: FLARE's FedAvg sums the updates in the order they arrive (floating-point sums depend on
order, so two runs of the same job would differ), and it cannot refuse an update whose keys, shapes or
values do not fit the global model. ``SiteOrderedAggregator`` checks every update against the global
model it answers (``update_problem``), holds the good ones and sums them in site order, with the same
weights, helpers and result as FLARE's built-in InTime aggregation (nvflare 2.9
``FedAvg._aggregate_one_result``/``_get_aggregated_result``), so a run repeats bit for bit.

A new aggregation rule is a subclass that overrides ``weight(site, result)`` (e.g. FedPIDAvg,
``fedseg.pidavg.PIDAggregator``: weights from each site's data size and loss history, kept in the subclass), not
a new controller: the controllers call only
``start_round``, ``accept_model``, ``accepted``, ``aggregate_model`` and ``reset_stats``.
"""

from __future__ import annotations

import math

import numpy as np
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.aggregators.weighted_aggregation_helper import (
    AggregationStatsKey,
    WeightedAggregationHelper,
    filter_aggregatable_metrics,
)
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.base_fedavg import make_fedavg_metrics_aggregation_info

CLIENT_NAME_KEY = "client_name"  # where FLARE's model controller puts the sender in a result's meta (nvflare 2.9)
SITE_WEIGHT_KEY = "effective_fedavg_metric_weight"  # FedAvg's name for the weight in its aggregation info


def site_name(result: FLModel) -> str:
    """The sender of a result, as FLARE's FedAvg names it (``CLIENT_UNKNOWN`` when missing or not a name)."""
    value = (result.meta or {}).get(CLIENT_NAME_KEY, AppConstants.CLIENT_UNKNOWN)
    return value if isinstance(value, str) and value else AppConstants.CLIENT_UNKNOWN


def num_steps_weight(result: FLModel) -> float:
    """The local steps a site reports, as FedAvg weighs them: 1.0 unless a finite positive number."""
    value = (result.meta or {}).get(FLMetaKey.NUM_STEPS_CURRENT_ROUND)
    if value is None or isinstance(value, bool):
        return 1.0
    try:
        weight = float(value)
    except (TypeError, ValueError, OverflowError):
        return 1.0
    return weight if math.isfinite(weight) and weight > 0 else 1.0


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


class SiteOrderedAggregator(ModelAggregator):
    """Checks each update, holds the good ones, and averages them in site order (FedAvg's weights and result).

    Args:
        exclude_vars: FedAvg's ``exclude_vars``, a regex of parameters left out of the average.
        aggregation_weights: FedAvg's per-site weights (1.0 for a site not named).
        key_metric: the ``key_metric`` entry FedAvg adds to its aggregation info (from its stop condition).
    """

    WEIGHT_FORMULA = "aggregation_weight * NUM_STEPS_CURRENT_ROUND"  # how ``weight`` is computed, for the info

    def __init__(
        self, exclude_vars: str | None = None, aggregation_weights: dict | None = None, key_metric: dict | None = None
    ) -> None:
        FLComponent.__init__(self)  # ModelAggregator does not: our logger
        super().__init__()
        self.exclude_vars = exclude_vars
        self.aggregation_weights = aggregation_weights or {}
        self.key_metric = key_metric
        self.reference: dict = {}
        self.current_round: int | None = None
        self.held: dict[str, FLModel] = {}
        self.rejected: dict[str, str] = {}
        self.stats: dict = {}
        self.warned_metric_keys: set[str] = set()

    def start_round(self, reference: dict | None, current_round: int | None) -> None:
        """A new round: updates are checked against ``reference``, the global model sent to the sites."""
        self.reset_stats()
        self.reference = reference or {}
        self.current_round = current_round

    def reset_stats(self) -> None:
        self.held, self.rejected = {}, {}

    def problem(self, result: FLModel) -> str | None:
        if not self.reference:  # nothing to compare with: only an empty update is refused (as FedAvg does)
            return None if result.params else "empty update (no parameters)"
        return update_problem(result.params, self.reference)

    def accept_model(self, model: FLModel) -> bool:
        """Hold an update that fits the global model; False (its reason in ``rejected``) for one that does not."""
        site = site_name(model)
        reason = self.problem(model)
        if reason:
            self.rejected[site] = reason
            return False
        self.held[site] = model
        return True

    def accepted(self) -> list[FLModel]:
        """The held updates in site order: the order they are summed in, whatever order they arrived in."""
        return [self.held[site] for site in sorted(self.held)]

    def weight(self, site: str, result: FLModel) -> float:
        """A site's weight: its aggregation weight x the steps it took this round (FedAvg's rule)."""
        return self.aggregation_weights.get(site, 1.0) * num_steps_weight(result)

    def aggregate_model(self) -> FLModel:
        """FedAvg's InTime aggregation of the held updates, fed in site order; the held updates are dropped."""
        params = WeightedAggregationHelper(exclude_vars=self.exclude_vars)
        metrics = WeightedAggregationHelper()
        all_metrics, site_weights, params_type = True, {}, None
        held = self.accepted()
        for result in held:
            site = site_name(result)
            params_type = result.params_type if params_type is None else params_type
            weight = self.weight(site, result)
            site_weights[site] = {"name": site, "weight": weight, "weight_key": SITE_WEIGHT_KEY}
            params.add(data=result.params, weight=weight, contributor_name=site, contribution_round=self.current_round)
            if result.metrics is None:  # one site without metrics: no round metrics (FedAvg's rule)
                all_metrics = False
            aggregatable = filter_aggregatable_metrics(
                result.metrics if all_metrics else None,
                warn_skipped=lambda k, tn: self.warning(f"Metric '{k}' ({tn}) skipped for aggregation."),
                warned_metric_keys=self.warned_metric_keys,
            )
            if aggregatable:
                metrics.add(
                    data=aggregatable, weight=weight, contributor_name=site, contribution_round=self.current_round
                )
        self.stats = {**params.get_aggregation_stats(), AggregationStatsKey.ROUND: self.current_round}
        meta = {"nr_aggregated": len(held), "current_round": self.current_round}
        meta[AppConstants.METRICS_AGGREGATION_INFO] = self.metrics_info(list(site_weights.values()))
        self.reset_stats()
        return FLModel(
            params=params.get_result(),
            params_type=params_type,
            metrics=(metrics.get_result() if all_metrics else None) or None,
            current_round=self.current_round,
            meta=meta,
        )

    def metrics_info(self, site_weights: list[dict]) -> dict:
        """FedAvg's description of how the round metrics were averaged (its ``_make_metrics_aggregation_info``)."""
        info = make_fedavg_metrics_aggregation_info(
            weight_key=SITE_WEIGHT_KEY if site_weights else FLMetaKey.NUM_STEPS_CURRENT_ROUND,
            weight_formula=self.WEIGHT_FORMULA if site_weights else None,
            site_weights=site_weights or None,
        )
        if self.key_metric:
            info["key_metric"] = self.key_metric
        return info
