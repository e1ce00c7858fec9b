"""Partial participation: which sites train each round, and what a round needs to update the model."""

from __future__ import annotations

from collections import Counter

import pytest

from fedseg.controller import RecordingFedAvg, participants
from fedseg.jobs.recipes import JobSettings

SITES = [f"site-{i}" for i in range(1, 6)]


def test_k_of_K_sites_repeatably_from_seed_and_round_alone():
    draws = [participants(SITES, 2, seed=7, round_number=r) for r in range(40)]
    assert all(len(d) == 2 and len(set(d)) == 2 and set(d) <= set(SITES) and d == sorted(d) for d in draws)
    # the same (seed, round) gives the same sites whatever the order the sites connected in
    assert draws == [participants(list(reversed(SITES)), 2, seed=7, round_number=r) for r in range(40)]
    # another seed gives another sequence, and seed + 1 does not replay seed one round later
    other = [participants(SITES, 2, seed=8, round_number=r) for r in range(40)]
    assert other != draws and other[:-1] != draws[1:]
    # over many rounds every site takes part, about k/K of the time
    counts = Counter(site for r in range(1000) for site in participants(SITES, 2, seed=0, round_number=r))
    assert set(counts) == set(SITES)
    assert all(300 < n < 500 for n in counts.values())


@pytest.mark.parametrize("k", [0, 5, 9])
def test_zero_or_k_at_least_K_is_every_site(k):
    assert participants(list(reversed(SITES)), k, seed=3, round_number=4) == SITES


def test_negative_k_is_refused():
    with pytest.raises(ValueError, match="clients_per_round"):
        participants(SITES, -1, 0, 0)


def test_a_round_with_fewer_participants_than_min_clients_still_updates():
    ctl = RecordingFedAvg(num_clients=5, num_rounds=1, min_clients=3, clients_per_round=2)
    rounds = ctl.rounds
    rounds.targets = ["site-2", "site-4"]
    rounds.site_records = {"site-2": {}}
    assert not rounds.enough_updates()  # one of the two answered
    rounds.site_records["site-4"] = {}
    assert rounds.enough_updates()
    rounds.targets = SITES  # every site asked: the majority rule stands
    assert not rounds.enough_updates()


def test_job_settings_check_the_participation_and_variant():
    assert JobSettings(sites=SITES, clients_per_round=2).clients_per_round == 2
    with pytest.raises(ValueError, match="clients_per_round"):
        JobSettings(sites=SITES, clients_per_round=6)
    with pytest.raises(ValueError, match="fedref_variant"):
        JobSettings(fedref_variant="median")
    assert JobSettings().fedref_variant == "trend" and JobSettings().clients_per_round == 0
