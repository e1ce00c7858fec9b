"""The FeTS Challenge 2022 Task 1 regime as pure functions: the simulated clock, the convergence score, the
collaborator-selection policies teams used, and collaborator sizes from ``partitioning_2.csv``.

Task 1 ranked aggregation methods by how fast they converge in a simulated week of federation time, not in
rounds. Having the clock and the score here (numpy only, no FLARE or openfl) lets a FedRef-Seg run be scored
the way the challenge scored it, and since every function depends only on its arguments (seed, round), every
algorithm of a seed sees the same site speeds, the same round durations and the same random selections.

Source: FeTS-AI/Challenge, ``Task_1/`` at commit 1c122653778b290fa2467e3d0305ff178e02d303 (the clock, the
tables and the score are unchanged since the 2022 challenge, commit 21546eaec2a820c9669d66420df90e21608aa8b9):
``fets_challenge/experiment.py`` (tables, ``gen_collaborator_time_stats``, ``compute_times_per_collaborator``,
the score in ``run_challenge_experiment``) and ``FeTS_Challenge.py`` (the ``choose_training_collaborators``
hooks). The figures are the source's; the code is ours. See docs/design.md, "The FeTS Challenge Task 1 regime".
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedseg.data_prep.partitions import read_partitions

Stat = tuple[float, float]  # (mean, sd) in seconds

WEEK_SECONDS = 7 * 24 * 3600  # experiment.py, MAX_SIMULATION_TIME
SOURCE_SEED = 0xFEEDFACE  # gen_collaborator_time_stats' default; run_challenge_experiment never passes another
SOURCE_TRAIN_FRACTION = 0.8  # run_challenge_experiment -> construct_fedsim_csv(..., 0.8, ...)

# The published timing tables, row for row as in FeTS-AI/Challenge Task_1/fets_challenge/experiment.py
# (TRAINING_TIMES, VALIDATION_TIMES, DOWNLOAD_TIMES, UPLOAD_TIMES; read by gen_collaborator_time_stats) at
# commit 1c122653778b290fa2467e3d0305ff178e02d303. (mean, sd) seconds from real FeTS federation timings.
# Seconds to train on one case (one epoch):
TRAINING_SECONDS_PER_CASE: tuple[Stat, ...] = (
    (6.710741331207654, 0.8726112813698301),
    (2.7343911917098445, 0.023976155580152165),
    (3.173076923076923, 0.04154320960517865),
    (6.580379746835443, 0.22461890673025595),
    (3.452046783625731, 0.47136389322749656),
    (6.090788461700995, 0.08541499003440205),
    (3.206933911159263, 0.1927067498514361),
    (3.3358208955223883, 0.2950567549663471),
    (4.391304347826087, 0.37464538999161057),
    (6.324805129494594, 0.1413885448869165),
    (7.415133477633478, 1.1198881747151301),
    (5.806410256410255, 0.029926699295169234),
    (6.300204918032787, 0.24932319729777577),
    (5.886317567567567, 0.018627858809133223),
    (5.478184991273998, 0.04902740607167421),
    (6.32440159574468, 0.15838847558954935),
    (20.661918328585003, 6.085405543890793),
    (3.197901325478645, 0.07049966132127056),
    (6.523963730569948, 0.2533266757118492),
    (2.6540077569489338, 0.025503099659276184),
    (1.8025746183640918, 0.06805805332403576),
)
# Seconds to validate one case (the same row as training: one row index per collaborator):
VALIDATION_SECONDS_PER_CASE: tuple[Stat, ...] = (
    (23.129135113591072, 2.5975116854269507),
    (12.965544041450777, 0.3476297824941513),
    (14.782051282051283, 0.5262660449172765),
    (16.444936708860762, 0.42613177203005187),
    (15.728654970760235, 4.327559980390658),
    (12.946098012884802, 0.2449927822869217),
    (15.335950126991456, 1.1587597276712558),
    (24.024875621890544, 3.087348297794285),
    (38.361702127659576, 2.240113332190875),
    (16.320970580839827, 0.4995108101783225),
    (30.805555555555554, 3.1836337269688237),
    (12.100899742930592, 0.41122386959584895),
    (13.099897540983607, 0.6693132795197584),
    (9.690202702702702, 0.17513593019922968),
    (10.06980802792321, 0.7947848617875114),
    (14.605333333333334, 0.6012305898922827),
    (36.30294396961064, 9.24123672148819),
    (16.9130060292851, 0.7452868131028928),
    (40.244078460399706, 3.7700993678269037),
    (13.161603102779575, 0.1975347910041472),
    (11.222161868549701, 0.7021223062972527),
)
# Seconds to download the global model, once per round:
DOWNLOAD_SECONDS: tuple[Stat, ...] = (
    (112.42869743589742, 14.456734719659513),
    (117.26870618556701, 12.549951446132013),
    (13.059666666666667, 4.8700489616521185),
    (47.50220338983051, 14.92128656898884),
    (162.27864210526315, 32.562113378948396),
    (99.46072058823529, 13.808785580783224),
    (33.6347090909091, 25.00299299660141),
    (216.25489393939392, 19.176465340447848),
    (217.4117230769231, 20.757673955585453),
    (98.38857297297298, 13.205048376808929),
    (88.87509473684209, 23.152936862511545),
    (66.96994262295081, 16.682497150763503),
    (36.668852040816326, 13.759109844677598),
    (149.31716326530614, 26.018185409516104),
    (139.847, 80.04755583050091),
    (54.97624444444445, 16.645170929316794),
)
# Seconds to upload an update (the same row as download: a second row index per collaborator):
UPLOAD_SECONDS: tuple[Stat, ...] = (
    (192.28497409326425, 21.537450985376967),
    (194.60103626943004, 24.194406902237056),
    (20.0, 0.0),
    (52.43859649122807, 5.047207127169352),
    (182.82417582417582, 14.793519078918195),
    (143.38059701492537, 7.910690646792151),
    (30.695652173913043, 9.668122350904568),
    (430.95360824742266, 54.97790476867727),
    (348.3174603174603, 30.14347985347738),
    (141.43715846994536, 5.271340868190727),
    (158.7433155080214, 64.87526819391198),
    (81.06086956521739, 7.003461202082419),
    (32.60621761658031, 5.0418315093016615),
    (281.5388601036269, 90.60338778706557),
    (194.34065934065933, 36.6519776778435),
    (66.53787878787878, 16.456280602190606),
)


# -- the clock ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """A collaborator's rows of the tables: ``compute_row`` (train and validate), ``network_row`` (download, upload)."""

    compute_row: int
    network_row: int

    @property
    def train(self) -> Stat:
        return TRAINING_SECONDS_PER_CASE[self.compute_row]

    @property
    def validate(self) -> Stat:
        return VALIDATION_SECONDS_PER_CASE[self.compute_row]

    @property
    def download(self) -> Stat:
        return DOWNLOAD_SECONDS[self.network_row]

    @property
    def upload(self) -> Stat:
        return UPLOAD_SECONDS[self.network_row]


def collaborator_timings(collaborators: Sequence[str], seed: int = SOURCE_SEED) -> dict[str, Timing]:
    """Each collaborator's rows, drawn once: as the source, a legacy numpy generator seeded with ``seed`` draws,
    collaborator by collaborator in the given order, the compute row then the network row (``randint(21)``,
    ``randint(16)``). The order matters: the source draws in sorted-string order of the partition ids (see
    ``source_order``). The result keeps the given order, which ``round_seconds`` draws in.
    """
    if len(set(collaborators)) != len(collaborators):
        raise ValueError(f"collaborator names must be unique, got {list(collaborators)}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"the timing seed must be in [0, 2**32), got {seed}")
    rng = np.random.RandomState(seed)  # the generator behind np.random.seed, without touching the global one
    timings = {}
    for name in collaborators:
        compute_row = int(rng.randint(len(VALIDATION_SECONDS_PER_CASE)))
        timings[name] = Timing(compute_row, int(rng.randint(len(DOWNLOAD_SECONDS))))
    return timings


def clipped_normal(rng: np.random.RandomState, stat: Stat) -> float:
    """One normal draw clipped below at 1 s (the source's ``max(1, draw)``, applied per case for the per-case ones)."""
    return max(1.0, float(rng.normal(loc=stat[0], scale=stat[1])))


def round_seconds(
    timings: Mapping[str, Timing],
    chosen: Sequence[str],
    cases: Mapping[str, tuple[int, int]],
    round_number: int,
    epochs: float = 1,
) -> tuple[float, dict[str, float]]:
    """(the round's seconds, each collaborator's seconds): the source's clock for one round.

    A legacy numpy generator seeded with the round number draws, collaborator by collaborator in ``timings``'
    order (one stream, so who trains changes the later collaborators' draws, as in the source): download, then
    validation cases x a per-case draw; a chosen collaborator then adds training cases x ``epochs`` x a per-case
    draw, a second validation draw x validation cases (its local model) and an upload. ``cases`` maps each
    collaborator to (training cases, validation cases). The round lasts as long as its slowest collaborator.
    """
    unknown = sorted(set(chosen) - set(timings))
    if unknown:
        raise ValueError(f"chosen collaborators {unknown} have no timing")
    missing = sorted(set(timings) - set(cases))
    if missing:
        raise ValueError(f"collaborators {missing} have no case counts")
    rng = np.random.RandomState(round_number)
    training = set(chosen)
    seconds = {}
    for name, timing in timings.items():
        n_train, n_validate = cases[name]
        total = 0.0
        total += clipped_normal(rng, timing.download)
        total += n_validate * clipped_normal(rng, timing.validate)
        if name in training:
            per_case = clipped_normal(rng, timing.train)
            total += (n_train * epochs) * per_case
            total += n_validate * clipped_normal(rng, timing.validate)
            total += clipped_normal(rng, timing.upload)
        seconds[name] = total
    return max(seconds.values()), seconds


# -- the score --------------------------------------------------------------------------------------------------
@dataclass
class ConvergenceScore:
    """The challenge's convergence score: the area under best-Dice-so-far over simulated time, projected to a week.

    ``add_round(dice, seconds)`` takes the round's global validation Dice and its ``round_seconds``: best =
    the best Dice so far (the source starts it at -1 and replaces it only by a strictly larger Dice, so a NaN
    never counts), auc += best x seconds, projected = ((week - total time) x best + auc) / week. The source
    stops after the round whose time makes the total exceed the week (``spent``), and that round counts: its
    projected score, with a negative remaining time, is exactly the area up to the week's end divided by it.
    """

    week: float = WEEK_SECONDS
    best: float = -1.0
    auc: float = 0.0
    total_seconds: float = 0.0
    rounds: int = 0

    def add_round(self, dice: float, seconds: float) -> float:
        """Record one round; returns the projected score after it."""
        if self.spent:
            raise ValueError(
                f"the week is spent after {self.rounds} rounds ({self.total_seconds:.0f} s): no more rounds"
            )
        if seconds < 0:
            raise ValueError(f"a round cannot last {seconds} s")
        self.total_seconds += seconds
        if self.best < dice:
            self.best = dice
        self.auc += self.best * seconds
        self.rounds += 1
        return self.projected

    @property
    def projected(self) -> float:
        return ((self.week - self.total_seconds) * self.best + self.auc) / self.week

    @property
    def spent(self) -> bool:
        """True once the total exceeds the week (strictly, as the source): no round may follow."""
        return self.total_seconds > self.week


# -- collaborator selection --------------------------------------------------------------------------------------
# A policy: (collaborators, training cases per collaborator, round number, seed, last round's seconds per
# collaborator or None) -> the collaborators that train this round, in the given order.
Policy = Callable[[Sequence[str], Mapping[str, int], int, int, "Mapping[str, float] | None"], list[str]]


def _in_given_order(collaborators: Sequence[str], picked) -> list[str]:
    picked = set(picked)
    return [c for c in collaborators if c in picked]


def select_all(collaborators, sizes, round_number, seed, last_times) -> list[str]:
    """Everyone trains every round (the source's default, ``all_collaborators_train``)."""
    return list(collaborators)


def random_k(collaborators, sizes, round_number, seed, last_times, k: int) -> list[str]:
    """k collaborators drawn from (seed, round) alone, everyone when k >= their number.

    The draw is ``fedseg.rounds.participants``' (``random.Random(f"participation:{seed}:{round}")`` sampling the
    sorted names), so ``random:6`` picks the same sites as ``clients_per_round=6`` for every algorithm of a seed.
    """
    ordered = sorted(collaborators)
    if k >= len(ordered):
        return list(collaborators)
    return _in_given_order(collaborators, random.Random(f"participation:{seed}:{round_number}").sample(ordered, k))


def largest_k(collaborators, sizes, round_number, seed, last_times, k: int) -> list[str]:
    """The k collaborators with the most training cases, every round (equal sizes: the earlier name first)."""
    missing = sorted(set(collaborators) - set(sizes))
    if missing:
        raise ValueError(f"collaborators {missing} have no size")
    return _in_given_order(collaborators, sorted(collaborators, key=lambda c: (-sizes[c], c))[:k])


def drop_slow(collaborators, sizes, round_number, seed, last_times, k: int) -> list[str]:
    """Everyone but the k slowest of the last round (our definition: the source gives none).

    Slowest = the largest seconds in ``last_times`` (``round_seconds``' per-collaborator output for the
    previous round); equal times: the earlier name is dropped first. Collaborators without a last time (round
    0, newcomers) are kept, and at least one collaborator always trains. A dropped collaborator only downloads
    and validates in that round, so it looks fast next round and comes back: with the clock's times, drop_slow
    alternates rather than excluding a slow site for good.
    """
    timed = sorted((c for c in collaborators if last_times and c in last_times), key=lambda c: (-last_times[c], c))
    dropped = set(timed[: min(k, len(collaborators) - 1)])
    return [c for c in collaborators if c not in dropped]


POLICIES: dict[str, Callable[..., list[str]]] = {
    "all": select_all,
    "random": random_k,
    "largest": largest_k,
    "drop_slow": drop_slow,
}
POLICY_USAGE = "all, random:K, largest:K or drop_slow:N (K, N whole numbers >= 1)"


def parse_policy(text: str) -> Policy:
    """A policy from its name: ``all``, ``random:6``, ``largest:6``, ``drop_slow:2``; ValueError in one line."""
    name, sep, number = text.strip().partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown collaborator policy {text!r}: use {POLICY_USAGE}")
    if name == "all":
        if sep:
            raise ValueError(f"collaborator policy 'all' takes no number, got {text!r}")
        return select_all
    if not sep:
        raise ValueError(f"collaborator policy {name!r} needs a number, e.g. {name}:6, got {text!r}")
    if not number.strip().isdigit() or int(number) < 1:
        raise ValueError(f"collaborator policy {text!r}: the number must be a whole number >= 1")
    return functools.partial(POLICIES[name], k=int(number))


# -- collaborator sizes ------------------------------------------------------------------------------------------
def partition_sizes(csv_path: str) -> dict[int, int]:
    """Subjects per partition of an official partitioning CSV, in file order (strict: a bad row is an error)."""
    return {partition: len(subjects) for partition, subjects in read_partitions(csv_path).items()}


def source_order(partitions: Sequence[int]) -> list[int]:
    """The partitions in the order the source names and times collaborators: it reads ``Partition_ID`` as text
    and sorts it (1, 10, 11, ..., 19, 2, 20, ...), so pass names in this order to reproduce its timings."""
    return sorted(partitions, key=str)


def source_split(subjects: int) -> tuple[int, int]:
    """(training, validation) cases the source gives a partition of that many subjects: int(0.8 x n) to train."""
    n_train = int(subjects * SOURCE_TRAIN_FRACTION)
    return n_train, subjects - n_train


def clock_cases(csv_path: str, sites: Sequence[str]) -> dict[str, list[int]]:
    """site-<partition> -> [training, validation] cases as the challenge splits that partition (``source_split``)."""
    sizes = partition_sizes(csv_path)  # PartitionCsvError (a ValueError) in one line
    by_name = {f"site-{partition}": list(source_split(n)) for partition, n in sizes.items()}
    unknown = [site for site in sites if site not in by_name]
    if unknown:
        raise ValueError(
            f"challenge clock {csv_path}: site(s) {', '.join(unknown)} are not site-<partition> of its "
            f"{len(sizes)} partitions"
        )
    return {site: by_name[site] for site in sites}


def scaled_sizes(sizes: Mapping, total: int) -> dict:
    """The sizes scaled to ``total`` (e.g. what a CPU can train), each at least 1, summing to exactly ``total``.

    Largest remainder, in integers: collaborators whose share would be under 1 get 1 (repeatedly, as each pin
    shrinks the rest's budget); the others get the floor of their share of what is left, and the units still
    missing go to the largest remainders (equal remainders: the larger size, then the earlier key). The order
    of sizes is kept: a larger size never gets fewer cases; equal sizes differ by at most one, the earlier not
    smaller. Keys and their order are kept; ``scaled_sizes(s, sum(s.values()))`` is ``s``.
    """
    bad = {key: size for key, size in sizes.items() if not isinstance(size, int) or size < 1}
    if bad:
        raise ValueError(f"sizes must be whole numbers >= 1, got {bad}")
    if total < len(sizes):
        raise ValueError(f"a total of {total} cannot give {len(sizes)} collaborators at least 1 case each")
    keys, pinned = list(sizes), set()
    while True:
        free = [key for key in keys if key not in pinned]
        budget, mass = total - len(pinned), sum(sizes[key] for key in free)
        under_one = {key for key in free if sizes[key] * budget < mass}
        if not under_one:
            break
        pinned |= under_one
    shares = {key: divmod(sizes[key] * budget, mass) for key in free}
    scaled = {key: 1 if key in pinned else shares[key][0] for key in keys}
    by_remainder = sorted(free, key=lambda key: (-shares[key][1], -sizes[key], keys.index(key)))
    for key in by_remainder[: budget - sum(shares[key][0] for key in free)]:
        scaled[key] += 1
    return scaled
