"""Network: what a hospital's link costs a FedRef round, at three uplinks, full precision and float16.

A provisioned federation on a testbed (``fedseg.app.testbed``: one network namespace per host, joined by a
bridge): the server, three hospitals and the researcher's admin host, the kits made from
``app/provision/project.yml`` for the testbed's host names (``server.fedseg.test``), the policies
``fedseg install-policy`` installs, every kit started by its own ``startup/start.sh`` on its own host, jobs
submitted from the admin host through the FLARE API (``fedseg.app.testbed_federation``). One federation
serves the whole benchmark; between jobs only the hospitals' links change (``Testbed.shape`` on site-1..3,
both ways; the server's link is not shaped).

Each job is FedRef with the ``fets2022`` profile's network (channels 32-64-128-256: 9.6 MB a model in
float32) and, deliberately, very little compute: synthetic FeTS-shaped cases on a 32x32x24 grid, crop
32x32x24, 2 local steps of one crop, one torch thread, no cross-site evaluation, 5 s of waiting for the
last site once a majority has answered. So the transfer shows; the transfer seconds are what carries over
to a real site, the compute seconds are not. Configurations: uplinks unlimited, 100 Mbit/s and 20 Mbit/s
(tc units, ``100mbit``: 10^6 bits/s), each with full-precision transfer and with ``float16``
(``JobSettings.quantization``: NVFlare's ModelQuantizer/ModelDequantizer on the training task, both ways).

From the server's round records (``round_metrics.jsonl``), per round after round 0 (round 0 includes
deploying the job, the sites' data caching and warm-up; it is kept in the file and left out of every
median), against the unlimited link with the same precision in the same invocation, paired by round number:

- ``round_seconds``: the round's wall time on the server (``seconds``: task sent to record written);
- ``transfer_seconds`` = round_seconds(rate) - round_seconds(unlimited);
- ``transfer_share`` = transfer_seconds / round_seconds(rate); ``round_vs_unlimited`` = the ratio;
- ``rest_transfer_seconds``: the same difference of the round's *rest* (round - the slowest site's own train
  + validation seconds), a cross-check with the sites' compute taken out of both sides;
- ``bytes_received_by_site`` / ``bytes_sent_by_site``: what the records say crossed (tensor payload, after
  the quantiser when there is one), median over the rounds and sites;
- ``link_bytes_down`` / ``link_bytes_up``: what really crossed each hospital's link between two round
  records (the bridge-side veth's counters: TLS, gRPC framing, heartbeats included), median over sites;
- ``line_seconds``: (link bytes down + up) x 8 / rate, the time the shaped link alone needs for them;
- ``flare_download_seconds`` / ``flare_upload_seconds``: FLARE's own timing of each transfer, from the sites'
  job logs (``[client] download ref=... elapsed=``: the global model pulled by the site; ``[server] download
  tx ... elapsed=``: the site's update, from the site offering it to the server having pulled it), and
  ``flare_transfer_seconds``, their sum's excess over the unlimited link's.

Each finished configuration is written to ``bench/results/network.json`` at once; a second run skips the
configurations already there (``--fresh`` runs them all again). Needs root (network namespaces).

    .venv/bin/python -m bench.network [--rounds 4] [--rates unlimited 100mbit 20mbit] [--precisions full float16]
                                      [--fresh] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time

from bench.common import json_ready, load_result, table, write_result
from bench.network_testbed import (
    INSTITUTIONS,
    JOB,
    PRECISIONS,
    SHAPE,
    SITES,
    TESTBED,
    UNLIMITED,
    prepare,
    run_config,
    start_federation,
)

RESULT_NAME = "network"


# -- the arithmetic (unit-tested in tests/unit/test_bench_summaries.py) ----------------------------------------
def rate_bits(rate: str | None) -> float | None:
    """Bits per second of a tc rate (``20mbit``, ``1gbit``, ``500kbit``); None for an unlimited link."""
    if rate in (None, UNLIMITED):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)", rate)
    if not match:
        raise ValueError(f"rate {rate!r}: a tc rate such as 100mbit or 20mbit, or {UNLIMITED}")
    return float(match.group(1)) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[match.group(2)]


def config_key(precision: str, rate: str, rounds: int) -> str:
    return f"{precision}|{rate}|r{rounds}"


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise_config(config: dict, baseline: dict | None) -> dict:
    """One configuration's medians over the rounds after round 0, and per round its figures against
    ``baseline`` (the unlimited link, same precision, same invocation), paired by round number."""
    later = [r for r in config["per_round"] if r["round"] != 0]
    if not later:
        raise ValueError(f"{config['precision']} @ {config['rate']}: no round after round 0: run at least 2 rounds")
    base = {r["round"]: r for r in (baseline or {}).get("per_round", [])}
    bits = rate_bits(config["rate"])
    rounds = []
    for r in later:
        row = {"round": r["round"], "round_seconds": r["seconds"], "rest_seconds": r["rest_seconds"]}
        down = _median(r.get("link_bytes_down", {}).values())
        up = _median(r.get("link_bytes_up", {}).values())
        row["line_seconds"] = (down + up) * 8 / bits if bits and down is not None and up is not None else None
        b = base.get(r["round"])
        if b is not None:
            row["transfer_seconds"] = r["seconds"] - b["seconds"]
            row["transfer_share"] = row["transfer_seconds"] / r["seconds"]
            row["round_vs_unlimited"] = r["seconds"] / b["seconds"]
            row["rest_transfer_seconds"] = r["rest_seconds"] - b["rest_seconds"]
        rounds.append(row)
    row = {
        "precision": config["precision"],
        "rate": config["rate"],
        "rate_bits_per_second": bits,
        "rounds_summarised": [r["round"] for r in later],
        "round0_seconds": next((r["seconds"] for r in config["per_round"] if r["round"] == 0), None),
        "baseline": None if baseline is None else f"{baseline['precision']} @ {baseline['rate']}",
        "missing": [f"round {r['round']}: {', '.join(r['missing'])}" for r in config["per_round"] if r["missing"]],
    }
    for name in (
        "round_seconds",
        "rest_seconds",
        "transfer_seconds",
        "transfer_share",
        "round_vs_unlimited",
        "rest_transfer_seconds",
        "line_seconds",
    ):
        row[name] = _median(r.get(name) for r in rounds)
    for name in ("bytes_received_by_site", "bytes_sent_by_site"):
        row[name] = _median(v for r in later for v in r[name].values())
    for name in ("link_bytes_down", "link_bytes_up"):
        row[name] = _median(v for r in later for v in r.get(name, {}).values())
    for name in ("download_seconds", "upload_seconds"):  # the first transfer of each way is round 0's
        row[f"flare_{name}"] = _median(v for site in config.get("flare_log", {}).values() for v in site[name][1:])
    row["per_round"] = rounds
    return row


def summarise(configs: list[dict]) -> list[dict]:
    """Every configuration against the unlimited link with its precision; bytes also against full precision
    at the same rate. Ordered by precision, then rate (unlimited first, then slower)."""
    by = {(c["precision"], c["rate"]): c for c in configs}
    rows = []
    for config in configs:
        baseline = by.get((config["precision"], UNLIMITED))
        rows.append(summarise_config(config, baseline))
    unlimited = {r["precision"]: r for r in rows if r["rate"] == UNLIMITED}
    for row in rows:
        base = unlimited.get(row["precision"])
        parts = [row["flare_download_seconds"], row["flare_upload_seconds"]]
        ok = (
            base is not None
            and None not in parts
            and None not in (base["flare_download_seconds"], base["flare_upload_seconds"])
        )
        row["flare_transfer_seconds"] = (
            sum(parts) - base["flare_download_seconds"] - base["flare_upload_seconds"] if ok else None
        )
    full = {r["rate"]: r for r in rows if r["precision"] == "full"}
    for row in rows:
        other = full.get(row["rate"])
        for name in ("bytes_received_by_site", "bytes_sent_by_site", "link_bytes_down", "link_bytes_up"):
            ok = other is not None and other.get(name) and row.get(name) is not None
            row[f"{name}_vs_full"] = row[name] / other[name] if ok else None
    order = list(PRECISIONS)
    rows.sort(
        key=lambda r: (
            order.index(r["precision"]) if r["precision"] in order else len(order),
            -(r["rate_bits_per_second"] or float("inf")),
        )
    )
    return rows


# -- the report --------------------------------------------------------------------------------------------
def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def markdown(summary: list[dict]) -> str:
    return table(
        [
            "link",
            "transfer",
            "round (s)",
            "transfer (s)",
            "transfer share",
            "round vs unlimited",
            "transfer from rest (s)",
            "line time (s)",
            "FLARE log: down + up (s)",
            "records: MB down / up per site",
            "link: MB down / up per site",
            "missing",
        ],
        [
            [
                r["rate"],
                r["precision"],
                _fmt(r["round_seconds"], ".2f"),
                _fmt(r["transfer_seconds"], "+.2f"),
                _fmt(r["transfer_share"], ".0%"),
                _fmt(r["round_vs_unlimited"], ".2f"),
                _fmt(r["rest_transfer_seconds"], "+.2f"),
                _fmt(r["line_seconds"], ".2f"),
                f"{_fmt(r['flare_download_seconds'], '.2f')} + {_fmt(r['flare_upload_seconds'], '.2f')}",
                f"{_fmt(r['bytes_received_by_site'], '.2f', 1e6)} / {_fmt(r['bytes_sent_by_site'], '.2f', 1e6)}",
                f"{_fmt(r['link_bytes_down'], '.2f', 1e6)} / {_fmt(r['link_bytes_up'], '.2f', 1e6)}",
                len(r["missing"]),
            ]
            for r in summary
        ],
    )


def parse_args() -> argparse.Namespace:
    """The options, refused before any work: round 0 alone, a rate tc would not take, no unlimited baseline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rates", nargs="+", default=[UNLIMITED, "100mbit", "20mbit"])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--fresh", action="store_true", help="run every configuration again (default: resume)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a job may take")
    parser.add_argument("--work", help="folder for data, kits and jobs (default: a temporary one)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 0 is left out of the medians")
    for rate in args.rates:
        try:
            rate_bits(rate)
        except ValueError as exc:
            parser.error(str(exc))
    if UNLIMITED not in args.rates:
        parser.error(f"--rates must include {UNLIMITED}: it is every configuration's baseline")
    return args


def kept_configs(args: argparse.Namespace) -> dict[str, dict]:
    """Unless --fresh: every configuration already in the result file (any rounds), by ``config_key``."""
    old = {} if args.fresh else load_result(RESULT_NAME)
    return {config_key(c["precision"], c["rate"], c["rounds"]): c for c in old.get("configurations", [])}


def planned_configs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(precision, rate), baselines first: a configuration's ratios need its precision's unlimited run."""
    return [(p, r) for p in args.precisions for r in sorted(args.rates, key=lambda r: rate_bits(r) is not None)]


def save(args: argparse.Namespace, configs: dict[str, dict], complete: bool) -> str:
    """The result file: every configuration kept, the summary of those with this invocation's rounds."""
    done = [c for c in configs.values() if c["rounds"] == args.rounds]
    return write_result(
        RESULT_NAME,
        {
            "profile": "fets2022",
            "algorithm": "fedref",
            "sites": SITES,
            "rounds": args.rounds,
            "rounds_in_medians": "rounds 1.. (round 0, deployment and warm-up, left out)",
            "data": {"shape": list(SHAPE), "subjects_per_site": [n for n, *_ in INSTITUTIONS]},
            "job": json_ready(JOB),
            "links": "each hospital's link shaped both ways with tc tbf (burst 64 KiB, 200 ms queue); "
            "the server's link unshaped",
            "summary": summarise(done) if done else [],
            "configurations": sorted(configs.values(), key=lambda c: (c["rounds"], c["precision"], c["rate"])),
            "complete": complete,
        },
    )


def run_missing(args: argparse.Namespace, configs: dict[str, dict], plan: list[tuple[str, str]]) -> None:
    """One federation on the testbed for every configuration not in ``configs``; the file saved after each.

    A job that did not finish every round stops the benchmark: its figures would be no configuration's.
    """
    from fedseg.app.testbed import can_run

    reason = can_run()
    if reason:
        sys.exit(f"bench.network: {reason}")
    with tempfile.TemporaryDirectory(prefix="fedseg_network_") as tmp, contextlib.ExitStack() as stack:
        work = os.path.abspath(args.work or tmp)
        os.makedirs(work, exist_ok=True)
        started = time.time()
        print("preparing data and kits", flush=True)
        _, prod = prepare(work)
        print(f"starting the federation on testbed {TESTBED} ({time.time() - started:.0f} s)", flush=True)
        federation = start_federation(work, prod, stack)
        print(f"sites connected ({time.time() - started:.0f} s)", flush=True)
        for number, (precision, rate) in enumerate(plan, 1):
            key = config_key(precision, rate, args.rounds)
            if key in configs:
                continue
            label = f"[{number}/{len(plan)}] {precision} @ {rate}"
            print(f"{label}: {args.rounds} rounds", flush=True)
            result = run_config(federation, precision, rate, args.rounds, args.timeout, label)
            print(
                f"{label}: {result['status']}, {result['completed_rounds']} rounds in "
                f"{result['job_wall_seconds']:.0f} s (whole benchmark so far {time.time() - started:.0f} s)",
                flush=True,
            )
            if result["status"] != "FINISHED:COMPLETED" or result["completed_rounds"] < args.rounds:
                raise RuntimeError(f"{label}: job {result['job_id']} {result['status']}; logs under {prod}")
            configs[key] = result
            save(args, configs, complete=False)


def main() -> None:
    args = parse_args()
    configs = kept_configs(args)
    plan = planned_configs(args)
    if any(config_key(p, r, args.rounds) not in configs for p, r in plan):
        run_missing(args, configs, plan)
    path = save(args, configs, complete=all(config_key(p, r, args.rounds) in configs for p, r in plan))
    with open(path, encoding="utf-8") as f:
        summary = json.load(f)["summary"]
    print(markdown(summary))
    print(f"medians over rounds 1..{args.rounds - 1}; ratios vs the unlimited link, same precision; written {path}")


if __name__ == "__main__":
    main()
