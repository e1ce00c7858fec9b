#!/usr/bin/env bash
# The fets2022 profile on one GPU, in one go (planned at about 8 minutes on one H200; each part writes its
# results as it finishes, so a run cut short keeps what was done):
#   1. bench.step_split --device cuda: where a site's training step goes (reading the cached case, host stage,
#      device stage, compute) with 0, 1 and 2 DataLoader workers, the loader thread on and off; the bare compute
#      step; validation's first round against later ones (data_share, step_vs_compute, first_vs_later);
#   2. bench.fets_scale --sites 1: one full-size site in FLARE's simulator (federation_step_vs_compute, data_share);
#   3. bench.fets_scale --sites 23: partitioning_1's 23 institutions at full size, $ROUNDS rounds: round time
#      against the compute bound, GPU memory per site process, host RAM, GPU and CPU use.
# Results: bench/results/step_split.json (entry "cuda"), bench/results/fets_scale.json ("cuda/1_sites",
# "cuda/23_sites"). The earlier parts of this script (bench.gpu_step, bench.site_scale --device cuda, a
# two-site federation) were measured on 2026-11-27 and are run by hand now: see docs/benchmarks.md.
#
#     bench/gpu_fets.sh [python]        (default: .venv/bin/python; python3 on a machine without the venv)
#     SMOKE=1 bench/gpu_fets.sh         (tiny sizes on the CPU: checks that the script runs; measures nothing)
#
# The python needs torch with CUDA, monai, nvflare (and their needs), nibabel and nilearn; fedseg itself is
# installed from this checkout into $WORK/site when it does not import.
set -euo pipefail
PY=${1:-.venv/bin/python}
WORK=${WORK:-bench/.work/gpu}
ROUNDS=${ROUNDS:-3}
SITES=${SITES:-23}
mkdir -p "$WORK"
if ! "$PY" -c "import fedseg" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-compile --target "$WORK/site" .
    export PYTHONPATH="$(cd "$WORK/site" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if [[ "${SMOKE:-0}" == 1 ]]; then
    "$PY" -m bench.step_split --smoke --device cpu --work "$WORK"
    "$PY" -m bench.fets_scale --smoke --device cpu --sites 1 --rounds 2 --work "$WORK"
    "$PY" -m bench.fets_scale --smoke --device cpu --sites 3 --rounds 2 --work "$WORK"
    exit 0
fi
"$PY" -m bench.step_split --device cuda --steps 30 --work "$WORK"
"$PY" -m bench.fets_scale --device cuda --sites 1 --rounds "$ROUNDS" --timeout 300 --work "$WORK"
"$PY" -m bench.fets_scale --device cuda --sites "$SITES" --rounds "$ROUNDS" --timeout 600 --work "$WORK"
