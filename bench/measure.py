"""Run one command and print its wall time and the peak RSS of its largest process, as JSON.

A fresh process per measurement, because the kernel's children-RSS counter only ever grows.
Usage: python -m bench.measure -- <command ...>

Also the helpers of the benchmarks that watch a process tree while it runs (a federation's workers):
its processes, their memory, CPU seconds, and stopping it.
"""

import contextlib
import json
import resource
import signal
import subprocess
import sys
import time


def process_tree(pid: int) -> list:
    """The process ``pid`` and every process below it (psutil processes; [] once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_memory(processes) -> tuple[float, float, float, int]:
    """(RSS sum, PSS sum, largest RSS) in MiB and the number of processes."""
    rss = pss = largest = 0.0
    count = 0
    for process in processes:
        try:
            value = process.memory_info().rss / 2**20
            with open(f"/proc/{process.pid}/smaps_rollup") as f:
                share = next((int(line.split()[1]) / 1024 for line in f if line.startswith("Pss:")), value)
        except (OSError, Exception):  # gone between listing and reading
            continue
        rss, pss, largest, count = rss + value, pss + share, max(largest, value), count + 1
    return rss, pss, largest, count


def raise_peak(peak: dict, pid: int) -> None:
    """Raise ``peak`` (rss_mib, pss_mib, largest_process_rss_mib, processes) to the tree's memory now.

    ``processes`` is counted at the PSS peak: the sample that decides what the tree took.
    """
    rss, pss, largest, count = tree_memory(process_tree(pid))
    if pss > peak["pss_mib"]:
        peak.update(pss_mib=pss, processes=count)
    peak["rss_mib"] = max(peak["rss_mib"], rss)
    peak["largest_process_rss_mib"] = max(peak["largest_process_rss_mib"], largest)


def stop_tree(pid: int) -> None:
    """End a process this script started and every process below it, by id: TERM, then KILL 3 s later."""
    for process in reversed(process_tree(pid)):
        with contextlib.suppress(Exception):
            process.send_signal(signal.SIGTERM)
    time.sleep(3)
    for process in reversed(process_tree(pid)):
        with contextlib.suppress(Exception):
            process.kill()


def cpu_seconds() -> dict:
    """CPU seconds so far: of the processes this script reaped, of this script, of the whole machine."""
    import psutil

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = resource.getrusage(resource.RUSAGE_SELF)
    machine = psutil.cpu_times()
    return {
        "federation": children.ru_utime + children.ru_stime,
        "this_script": mine.ru_utime + mine.ru_stime,
        "machine": sum(getattr(machine, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal")),
    }


if __name__ == "__main__":
    command = sys.argv[sys.argv.index("--") + 1 :]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # KiB on Linux
    print(json.dumps({"wall_seconds": wall, "peak_rss_mib": peak}))
