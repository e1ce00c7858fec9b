"""Running one function over many subjects, in worker processes, with a progress bar on stderr."""

from __future__ import annotations

import concurrent.futures
import sys


def progress(total: int, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="case", disable=not enabled or total == 0, file=sys.stderr, leave=True)


def run_parallel(jobs: list[tuple], fn, workers: int, label: str, show: bool, on_result) -> None:
    """Apply ``fn(*job)`` to every job, in ``workers`` processes (or in this one when workers == 1);
    ``on_result(job, result)`` runs here, in the order the results come."""
    bar = progress(len(jobs), label, show)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                on_result(job, fn(*job))
                bar.update()
            return
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(fn, *job): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                on_result(futures[future], future.result())
                bar.update()
    finally:
        bar.close()
