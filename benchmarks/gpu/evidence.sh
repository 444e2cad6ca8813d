#!/usr/bin/env bash
# Run THERE, on the H100/H200, through the device tool, from the repo root: the GPU evidence of the fused
# MoE kernel in one call. Fetch the wheels here first (benchmarks/gpu/fetch_wheels.sh), then:
#
#   run(command="bash benchmarks/gpu/evidence.sh", carry=[".whl"])              # tests, then the benchmark
#   run(command="bash benchmarks/gpu/evidence.sh bench", carry=[".whl"])        # one phase: tests | bench | tune
#
# Writes under $OUT (at most 8 files come back): gpu.txt, tests.log, moe-bench.log and the benchmark's
# moe-<gpu>.json / .md (copy the .md to docs/benchmarks/), or tune.log and the tuned config JSON.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv \
  | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

status=0
for phase in "${@:-tests bench}"; do
  for step in $phase; do
    case "$step" in
      tests) python3 -m pytest tests/kernels tests/local -m gpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.log" ;;
      bench) python3 benchmarks/moe_kernel.py --out "$OUT" 2>&1 | tee "$OUT/moe-bench.log" ;;
      tune) python3 benchmarks/tune_moe.py --out "$OUT" 2>&1 | tee "$OUT/tune.log" ;;
      *) echo "unknown phase $step (tests | bench | tune)" >&2; exit 2 ;;
    esac
    rc=${PIPESTATUS[0]}
    echo "== $step: exit $rc" | tee -a "$OUT/gpu.txt"
    [ "$rc" -eq 0 ] || status=$rc
  done
done
exit "$status"
