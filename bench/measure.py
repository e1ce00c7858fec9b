"""Run one command and print its wall time and the peak RSS of its largest process, as JSON.

A fresh process per measurement, because the kernel's children-RSS counter only ever grows.
Usage: python -m bench.measure -- <command ...>
"""

import json
import resource
import subprocess
import sys
import time

if __name__ == "__main__":
    command = sys.argv[sys.argv.index("--") + 1 :]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # KiB on Linux
    print(json.dumps({"wall_seconds": wall, "peak_rss_mib": peak}))
