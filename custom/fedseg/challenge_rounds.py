"""Who trains each round, and what the round costs on the FeTS Challenge's simulated clock (server side).

Why here and not in the controller: every controller (FedAvg, FedProx, FedOpt, FedPIDAvg, FedRef, Scaffold)
must choose the same sites and price the same rounds for a seed, or their convergence scores could not be
compared. ``RoundPlan`` is a pure function of the job's settings, the sites and the round number
(``fedseg.fets_challenge``'s policies and clock depend on nothing else), so a continued run replays the rounds
it already did to get the clock's total and the last round's times back, and nothing of it needs saving.

- ``selection_policy``: ``all``, ``random:K``, ``largest:K``, ``drop_slow:N`` (the challenge's hooks); empty:
  ``clients_per_round`` (k of K drawn from (seed, round): ``random:K``, the draw of ``fedseg.rounds.participants``);
- ``clock_cases``: site -> [training cases, validation cases] the clock prices (the partitioning CSV's real
  case counts, whatever the synthetic sites hold); empty: no clock;
- ``time_budget_seconds``: with the clock, the run stops after the round whose time makes the total exceed it
  (the challenge's week).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedseg import fets_challenge
from fedseg.server_config import JobRefused, integer, plain_name

MAX_CLOCK_CASES = 100000  # per site and split: FeTS2022 has 1,251 subjects in all
MAX_CLOCK_SITES = 10000
MAX_BUDGET_SECONDS = 10 * 365 * 24 * 3600
NEEDS_CLOCK = ("largest", "drop_slow")  # policies that read the clock's sizes or times
# This module stays light (fets_challenge and server_config: numpy only), so that JobSettings checks a job with
# the same function the server does.


def check_plan(policy: str, clients_per_round: int, clock_cases, budget_seconds) -> None:
    """Refuse (JobRefused, one line) a policy, clock or budget outside its type, range or meaning."""
    if not isinstance(policy, str) or len(policy) > 40:
        raise JobRefused(f"selection_policy = {policy!r}: expected a short text such as 'random:6'")
    if policy:
        try:
            fets_challenge.parse_policy(policy)
        except ValueError as error:
            raise JobRefused(f"selection_policy: {error}") from None
        if clients_per_round:
            raise JobRefused(
                f"selection_policy = {policy!r} and clients_per_round = {clients_per_round}: give one of them "
                "(random:K is clients_per_round = K)"
            )
        if policy.partition(":")[0] in NEEDS_CLOCK and not clock_cases:
            raise JobRefused(f"selection_policy = {policy!r} reads the clock's case counts or times: give clock_cases")
    check_clock_cases(clock_cases)
    integer("time_budget_seconds", budget_seconds, 1, MAX_BUDGET_SECONDS)


def check_clock_cases(clock_cases) -> None:
    if clock_cases is None:
        return
    if not isinstance(clock_cases, dict) or len(clock_cases) > MAX_CLOCK_SITES:
        raise JobRefused(f"clock_cases: expected a mapping of at most {MAX_CLOCK_SITES} sites to [train, validation]")
    for site, counts in clock_cases.items():
        plain_name("clock_cases site", site)
        if not isinstance(counts, (list, tuple)) or len(counts) != 2:
            raise JobRefused(f"clock_cases[{site!r}] = {counts!r}: expected [training cases, validation cases]")
        for split, count in zip(("training", "validation"), counts):
            integer(f"clock_cases[{site!r}] {split} cases", count, 0, MAX_CLOCK_CASES)


class RoundPlan:
    """One run's sequence of training sites and simulated round times (see the module docstring)."""

    def __init__(
        self,
        policy: str = "",
        clients_per_round: int = 0,
        seed: int = 0,
        clock_cases: Mapping[str, Sequence[int]] | None = None,
        budget_seconds: int = fets_challenge.WEEK_SECONDS,
    ) -> None:
        self.policy_text = policy
        self.policy = fets_challenge.parse_policy(policy) if policy else None
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.cases = {site: (int(n[0]), int(n[1])) for site, n in (clock_cases or {}).items()}
        self.budget_seconds = budget_seconds
        self.timings: dict | None = None
        self.total_seconds = 0.0
        self.last_times: dict[str, float] | None = None
        self.rounds_priced = 0

    @property
    def clock_on(self) -> bool:
        return bool(self.cases)

    def choose(self, sites: Sequence[str], round_number: int) -> list[str]:
        """The sites that train in this round, sorted."""
        ordered = sorted(sites)
        if self.policy is None:
            if not self.clients_per_round:
                return ordered
            return fets_challenge.random_k(ordered, {}, round_number, self.seed, None, k=self.clients_per_round)
        sizes = {site: self.cases.get(site, (0, 0))[0] for site in ordered}
        return sorted(self.policy(ordered, sizes, round_number, self.seed, self.last_times))

    def price(self, sites: Sequence[str], chosen: Sequence[str], round_number: int) -> dict:
        """The round on the clock: its seconds (its slowest site's) and the run's total so far; {} without a clock.

        The collaborators are timed in sorted-name order: for sites named ``site-<partition>`` that is the order
        in which the challenge draws its collaborators' table rows (``fets_challenge.source_order``).
        """
        if not self.clock_on:
            return {}
        ordered = sorted(sites)
        missing = [site for site in ordered if site not in self.cases]
        if missing:
            raise JobRefused(f"clock_cases has no case counts for site(s) {', '.join(missing)}")
        if self.timings is None or list(self.timings) != ordered:
            self.timings = fets_challenge.collaborator_timings(ordered)
        seconds, per_site = fets_challenge.round_seconds(self.timings, chosen, self.cases, round_number)
        self.total_seconds += seconds
        self.last_times = per_site
        self.rounds_priced += 1
        return {
            "simulated_seconds": seconds,
            "simulated_total_seconds": self.total_seconds,
            "slowest_site": max(per_site, key=lambda site: (per_site[site], site)),
        }

    def replay(self, sites: Sequence[str], rounds: int) -> None:
        """Choose and price rounds 0 .. rounds - 1 again (a continued run): the clock's state as it was."""
        for round_number in range(rounds):
            self.price(sites, self.choose(sites, round_number), round_number)

    @property
    def spent(self) -> bool:
        """True once the clock's total exceeds the budget: no round may follow (the challenge's rule)."""
        return self.clock_on and self.total_seconds > self.budget_seconds
