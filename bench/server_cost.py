"""Server cost of a round's aggregation: FedAvg alone vs FedAvg + FedRef's MAP step, time and memory.

For the demo network (0.6 M parameters) and a 22 M-parameter U-Net (channels 48..768), three sites'
updates are averaged with NVFlare's own ``WeightedAggregationHelper`` (what the controller uses); FedRef
then builds the reference model from its buffer (p = 3) and applies the MAP step. Memory: the bytes the
reference buffer holds (p copies of the model) next to the model itself. The share of a round is taken
against the demo's measured round time (``round_metrics.jsonl`` of a demo run, when given).

    .venv/bin/python -m bench.server_cost [--demo-run demo_output/workspace/fedseg_fedref]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bench.common import table, write_result


def state(channels) -> dict:
    from fedseg.network import FedSegUNet

    network = FedSegUNet(channels=channels)
    return {k: v.detach().numpy().copy() for k, v in network.state_dict().items()}


def measure(model: dict, sites: int = 3, repeats: int = 5) -> dict:
    from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper

    from fedseg.fedref import FedRefUpdater

    rng = np.random.default_rng(0)
    updates = [{k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) for k, v in model.items()} for _ in range(sites)]
    fedavg_times, fedref_times = [], []
    updater = FedRefUpdater(3, 0.1, 0.1)
    updater.start(model)
    current = model
    for _ in range(2):  # fill the buffer (warm-up rounds)
        current, _ = updater.update(updates[0], current)
    for _ in range(repeats):
        started = time.perf_counter()
        helper = WeightedAggregationHelper()
        for i, update in enumerate(updates):
            helper.add(data=update, weight=10.0 + i, contributor_name=f"site-{i}", contribution_round=0)
        averaged = helper.get_result()
        fedavg_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        new, applied = updater.update(averaged, current)
        fedref_times.append(time.perf_counter() - started)
        assert applied
        current = new
    model_mb = sum(v.nbytes for v in model.values()) / 2**20
    buffer_mb = sum(v.nbytes for m in updater.buffer.models for v in m.values()) / 2**20
    return {
        "parameters_m": sum(v.size for v in model.values()) / 1e6,
        "model_mib": model_mb,
        "fedavg_seconds": statistics.median(fedavg_times),
        "fedref_step_seconds": statistics.median(fedref_times),
        "buffer_mib": buffer_mb,
    }


def round_seconds(run_folder: str | None) -> float | None:
    if not run_folder:
        return None
    from fedseg.app.artifacts import load_run

    records = load_run(run_folder).rounds
    rounds = [r.get("seconds") for r in records[1:] if r.get("seconds")]
    if not rounds:  # older records: the time between consecutive round records
        times = [r["time"] for r in records if r.get("time")]
        rounds = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(rounds) if rounds else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-run", default=None, help="a demo run folder, for the share of a round")
    args = parser.parse_args()
    per_round = round_seconds(args.demo_run)
    rows = []
    from fedseg.network import DEFAULT_CHANNELS

    # the demo profile's network, and a 22 M-parameter one (the benchmark's own size, not a profile's)
    for name, channels in (("demo U-Net", DEFAULT_CHANNELS), ("22M U-Net", (48, 96, 192, 384, 768))):
        result = measure(state(channels))
        result["network"] = name
        result["fedref_vs_fedavg"] = result["fedref_step_seconds"] / result["fedavg_seconds"]
        if per_round and name == "demo U-Net":
            result["fedref_share_of_demo_round"] = result["fedref_step_seconds"] / per_round
        rows.append(result)
    path = write_result("server_cost", {"sites": 3, "p": 3, "demo_round_seconds": per_round, "rows": rows})
    print(
        table(
            [
                "network",
                "parameters (M)",
                "FedAvg aggregation (s)",
                "FedRef MAP step (s)",
                "step / aggregation",
                "buffer (MiB)",
                "model (MiB)",
            ],
            [
                [
                    r["network"],
                    f"{r['parameters_m']:.1f}",
                    f"{r['fedavg_seconds']:.4f}",
                    f"{r['fedref_step_seconds']:.4f}",
                    f"{r['fedref_vs_fedavg']:.2f}",
                    f"{r['buffer_mib']:.0f}",
                    f"{r['model_mib']:.0f}",
                ]
                for r in rows
            ],
        )
    )
    if per_round:
        print(f"demo round: {per_round:.1f} s; FedRef step = {100 * rows[0]['fedref_share_of_demo_round']:.3f}% of it")
    print(f"written {path}")


if __name__ == "__main__":
    main()
