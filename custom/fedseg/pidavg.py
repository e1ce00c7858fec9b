"""FedPIDAvg: each site's weight from its share of the data, the drop of its loss and its recent losses.

Source: L. Mächler, I. Ezhov, S. Shit, J. C. Paetzold, "FedPIDAvg: A PID controller inspired aggregation method
for Federated Learning", arXiv:2304.12117 (the winner of the FeTS Challenge 2022). It extends FedCostWAvg
(Mächler et al., arXiv:2111.08649, the winner of 2021: the data share and the drop of the cost, the "D" of a
PID controller) with an integral term over the site's recent costs ("I"). For the round's aggregated sites j:

    w_j = alpha * s_j / S  +  beta * k_j / K  +  gamma * m_j / I,        S = sum s_j, K = sum k_j, I = sum m_j
    s_j = the site's training cases (``n_train_cases``)
    k_j = max(0, c_j(previous) - c_j(now))         the drop of its loss since the last round it trained in
    m_j = mean of its last ``window`` losses, this round's included (window 6: c_j(n), ..., c_j(n - 5))

with alpha = 0.45, beta = 0.45, gamma = 0.1 (alpha + beta + gamma = 1). The cost c_j is the mean training loss
of the site's local steps that round (``train_loss``, what our trainer reports). The paper's text was not at
hand: the formula and constants are those of two public re-implementations that agree on them and quote the
paper's symbols (Manthe et al.'s benchmark code, MatthisManthe/Benchmark_FeTS2022,
``source/Train_FedPIDAvg_3D_multi_gpu.py`` and ``config_FedPIDAvg.json``: ``alpha_agg`` 0.45, ``beta_agg`` 0.45,
``gamma_agg`` 0.1, ``positive_difference`` true, six losses kept per site; and a Flower re-implementation,
``k_j = c(M_{i-1}^j) - c(M_i^j)``, ``K = sum(k_j)``, ``gamma * m_j / I``). Only the aggregation rule is here:
the paper's other part, each centre's local iterations chosen from a Poisson model of the centre sizes, is the
job's ``local_steps``/``local_epochs``.

Where the sources leave something open, the choices made here:
- the drop is clipped at 0 (as the benchmark's ``positive_difference``): a site whose loss rose gets no share of
  that term, never a negative weight that would push the average away from its update;
- each term is a share over the round's aggregated sites; a term no site has a share in (K = 0 in a site's
  first round, or when no loss fell; S = 0 or I = 0 when no usable size or loss came) is left out and the other
  coefficients are rescaled to sum to 1; with no term left, equal weights. The benchmark instead sets K = 1, so
  its weights then sum to alpha + gamma; another re-implementation runs plain FedAvg in the first round;
- m_j is the mean of the site's last ``window`` losses, not their sum: with every site at the same number of
  losses the shares are the same (the factor cancels in m_j / I), and a site that trained in fewer rounds
  (joined late, partial participation, first rounds) is not weighted down for the rounds it did not train;
- a site absent from a round keeps its history: its next drop is measured from the last loss it reported;
- a value the server cannot use (a loss or size that is not a finite non-negative number: NaN, Inf, negative,
  text, a bool, missing) gives the site no share of the terms that need it (a bad loss: no drop, no integral;
  a bad size: no data share) and a bad loss is not kept in its history, so it cannot poison a later round; its
  update still counts through the other terms. The update checks (``fedseg.aggregation``) run first: a
  rejected update is never weighed and its loss is not kept;
- only accepted updates of rounds that were aggregated add to the history (a round that keeps the global model
  records none). The history lives in the server's memory: a FedPIDAvg run is not continued after a restart.

The weights come from what the sites report, as FedAvg's step counts do; whatever a site reports, the loss
terms move at most beta + gamma of the weight. The round's metrics are averaged with the same weights.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nvflare.app_common.abstract.fl_model import FLModel

from fedseg.aggregation import SiteOrderedAggregator, site_name
from fedseg.server_config import JobRefused, integer, number

ALPHA, BETA, GAMMA = 0.45, 0.45, 0.1  # the paper's constants
WINDOW = 6  # this round's loss and the five before
MAX_WINDOW = 64
LOSS_KEY, SIZE_KEY = "train_loss", "n_train_cases"  # what the sites' trainer reports (fedseg.trainer)


def usable(value) -> float | None:
    """A finite, non-negative number as a float (a bool, text, NaN, Inf or a negative value: None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def loss_drop(history: Sequence[float], loss: float | None) -> float:
    """k_j: how much the loss fell since the site's last recorded one, clipped at 0 (0 without either)."""
    if loss is None or not history:
        return 0.0
    return max(0.0, history[-1] - loss)


def loss_integral(history: Sequence[float], loss: float | None, window: int) -> float:
    """m_j: the mean of the site's last ``window`` losses, this round's included (0 without a usable loss now)."""
    if loss is None:
        return 0.0
    recent = [*history[-(window - 1) :], loss] if window > 1 else [loss]
    return sum(recent) / len(recent)


def shares(values: Mapping[str, float]) -> dict[str, float] | None:
    """Each value over their sum, in site order; None when they sum to 0 (no site has a share)."""
    total = sum(values[site] for site in sorted(values))
    return {site: values[site] / total for site in sorted(values)} if total > 0 else None


def mix(terms: Sequence[tuple[float, Mapping[str, float]]], sites: Sequence[str]) -> dict[str, float]:
    """sum_t c_t * share_t(j) over the terms with a positive coefficient and a share, rescaled by their
    coefficients' sum (equal weights when no term is left); the weights sum to 1."""
    used = [(c, s) for c, s in ((c, shares(v)) for c, v in terms) if c > 0 and s is not None]
    total = sum(c for c, _ in used)
    if not used:
        return {site: 1.0 / len(sites) for site in sorted(sites)}
    return {site: sum(c * s[site] for c, s in used) / total for site in sorted(sites)}


@dataclass(frozen=True)
class PIDRule:
    """FedPIDAvg's constants and its weights: pure functions of the round's inputs and the sites' histories."""

    alpha: float = ALPHA
    beta: float = BETA
    gamma: float = GAMMA
    window: int = WINDOW

    @classmethod
    def checked(cls, alpha, beta, gamma, window) -> PIDRule:
        """The rule for a job's settings; JobRefused (one line) for a value out of its type or range."""
        for name, value in (("pid_alpha", alpha), ("pid_beta", beta), ("pid_gamma", gamma)):
            number(name, value, 0.0, 1.0)
        if abs(alpha + beta + gamma - 1.0) > 1e-6:
            raise JobRefused(
                f"pid_alpha + pid_beta + pid_gamma = {alpha + beta + gamma!r}: must be 1 (each weight is a mix of "
                "the three shares)"
            )
        integer("pid_window", window, 1, MAX_WINDOW)
        return cls(alpha, beta, gamma, window)

    def inputs(self, sizes: Mapping, losses: Mapping, history: Mapping[str, Sequence[float]]) -> dict[str, dict]:
        """Each site's s_j, c_j (None: not usable), k_j and m_j, from what it reported and its history."""
        found = {}
        for site in sorted(sizes):
            size, loss, past = usable(sizes[site]), usable(losses.get(site)), history.get(site, ())
            found[site] = {
                "size": size,
                "loss": loss,
                "drop": loss_drop(past, loss),
                "integral": loss_integral(past, loss, self.window),
            }
        return found

    def weights(self, inputs: Mapping[str, Mapping]) -> dict[str, float]:
        """w_j = alpha s_j/S + beta k_j/K + gamma m_j/I (the terms that can be formed, rescaled); sum 1."""
        size = {site: values["size"] or 0.0 for site, values in inputs.items()}
        drop = {site: values["drop"] for site, values in inputs.items()}
        integral = {site: values["integral"] for site, values in inputs.items()}
        return mix([(self.alpha, size), (self.beta, drop), (self.gamma, integral)], list(inputs))

    def remember(self, history: dict[str, list[float]], losses: Mapping[str, float | None]) -> None:
        """Add the round's usable losses to the sites' histories, keeping what the next round needs."""
        keep = max(self.window - 1, 1)
        for site, loss in sorted(losses.items()):
            if loss is not None:
                history[site] = [*history.get(site, []), loss][-keep:]


def reported(result: FLModel, key: str):
    return (result.metrics or {}).get(key)


class PIDAggregator(SiteOrderedAggregator):
    """The update checks and site-ordered average of ``SiteOrderedAggregator`` with FedPIDAvg's weights.

    The sites' loss histories are this aggregator's state, kept across rounds by the controller that owns it;
    ``last_round`` holds the last aggregated round's weights and inputs for its record.
    """

    WEIGHT_FORMULA = "alpha * s_j/S + beta * k_j/K + gamma * m_j/I (FedPIDAvg, fedseg.pidavg)"

    def __init__(self, rule: PIDRule, exclude_vars: str | None = None, key_metric: dict | None = None) -> None:
        super().__init__(exclude_vars, None, key_metric)
        self.rule = rule
        self.history: dict[str, list[float]] = {}
        self.round_weights: dict[str, float] = {}
        self.last_round: dict = self.record({}, {})

    def start_round(self, reference: dict | None, current_round: int | None) -> None:
        super().start_round(reference, current_round)
        self.round_weights, self.last_round = {}, self.record({}, {})

    def record(self, weights: dict, inputs: dict) -> dict:
        rule = self.rule
        constants = {"alpha": rule.alpha, "beta": rule.beta, "gamma": rule.gamma, "window": rule.window}
        return {**constants, "weights": weights, "inputs": inputs}

    def weight(self, site: str, result: FLModel) -> float:
        """The site's FedPIDAvg weight of this round (computed over every held update in ``aggregate_model``)."""
        return self.round_weights[site]

    def aggregate_model(self) -> FLModel:
        held = {site_name(r): r for r in self.accepted()}
        sizes = {site: reported(r, SIZE_KEY) for site, r in held.items()}
        losses = {site: reported(r, LOSS_KEY) for site, r in held.items()}
        inputs = self.rule.inputs(sizes, losses, self.history)
        self.warn_unusable(inputs, sizes, losses)
        self.round_weights = self.rule.weights(inputs)
        result = super().aggregate_model()
        self.rule.remember(self.history, {site: values["loss"] for site, values in inputs.items()})
        self.last_round = self.record(dict(self.round_weights), inputs)
        return result

    def warn_unusable(self, inputs: dict, sizes: dict, losses: dict) -> None:
        for site, values in inputs.items():
            for key, given, name in (("size", sizes, SIZE_KEY), ("loss", losses, LOSS_KEY)):
                if values[key] is None:
                    self.warning(
                        f"round {self.current_round}: {site} reported {name} = {given[site]!r}, not a finite "
                        "non-negative number: no FedPIDAvg share that needs it this round"
                    )
