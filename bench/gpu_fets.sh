#!/usr/bin/env bash
# The full-size FeTS2022 profile on a GPU, in one go (about 6 minutes on one H100):
#   1. a training step at the profile's size (128^3 crops, 2 per step, U-Net 32-256) with and without AMP;
#   2. bench.site_scale on the GPU: sites of 8 and 32 full-size cases (memory, s/step, validation, cache);
#   3. a 3-round FedRef federation of two full-size sites in the FLARE simulator, and its report.
# Results: bench/results/gpu_step.json, bench/results/site_scale_cuda.json, $WORK/fed_ws/fedseg_fedref/report.
#
#     bench/gpu_fets.sh [python]        (default: .venv/bin/python)
set -euo pipefail
PY=${1:-.venv/bin/python}
WORK=${WORK:-bench/.work/gpu}
mkdir -p "$WORK"
"$PY" -m bench.gpu_step --profile fets2022 --crops 128 --steps 10   # 2 crops per step, U-Net 32-256
"$PY" -m bench.site_scale --device cuda --sizes 8 32 --baseline-sizes --distinct 4 --steps 20 --rounds 2 --work "$WORK"
mkdir -p "$WORK/fed_sites"
ln -sfn ../site_8 "$WORK/fed_sites/site-1"
ln -sfn ../site_32 "$WORK/fed_sites/site-2"
"$PY" -m fedseg.app simulate --profile fets2022 --data-root "$WORK/fed_sites" --sites site-1 site-2 --rounds 3 \
    --workspace "$WORK/fed_ws"
"$PY" -m fedseg.app report "$WORK/fed_ws/fedseg_fedref"
