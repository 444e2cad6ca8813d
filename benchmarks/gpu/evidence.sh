#!/usr/bin/env bash
# Run THERE, on the H100/H200, through the device tool, from the repo root: the GPU evidence of the fused
# MoE kernel in one call. Fetch the wheels here first (benchmarks/gpu/fetch_wheels.sh), then:
#
#   run(command="bash benchmarks/gpu/evidence.sh", carry=[".whl"])          # tests, bench, tune, rebench
#   run(command="bash benchmarks/gpu/evidence.sh bench", carry=[".whl"])    # chosen phases, in order
#
# Phases:
#   tests    pytest tests/kernels tests/local -m gpu (4 processes when pytest-xdist is there)
#   bench    benchmarks/moe_kernel.py --int8, all 12 M (and the int8 build beside bf16): $OUT/moe-<gpu>.json, .md
#   tune     benchmarks/tune_moe.py on the M values that bench judged FAIL, in the time left over (it keeps
#            back as long as bench took, for rebench); the table lands in $OUT/tuned.json
#   rebench  bench again with the tuned table ($MIXTRAL_MOE_CONFIG_DIR): $OUT/after-tune/moe-<gpu>.json, .md
# tune and rebench do nothing when bench passed everywhere. Everything stays inside EVIDENCE_LIMIT_S (default
# 580 s: the device tool's 600-s command limit). At most 7 files come back: gpu.txt, evidence.log (every
# phase's output), the two reports, tuned.json and the two after-tune reports. Commit tuned.json as
# mixtral_local/kernels/configs/E=8,N=14336,K=4096,dtype=bfloat16,device=<GPU>.json with the report it made.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
LIMIT_S=${EVIDENCE_LIMIT_S:-580}
TUNED=/tmp/mixtral-tuned
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
LOG="$OUT/evidence.log"

workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n 4)  # 4: each may hold ~12 GB (Mixtral weights + fp32 reference)
bench_s=180  # until bench has run once here: about what 12 M values take
status=0
for step in ${@:-tests bench tune rebench}; do
  started=$SECONDS
  echo "== $step: start at ${started} s" | tee -a "$LOG"
  case "$step" in
    tests) python3 -m pytest tests/kernels tests/local -m gpu -q -p no:cacheprovider -rs "${workers[@]}" 2>&1 | tee -a "$LOG" ;;
    bench) python3 benchmarks/moe_kernel.py --int8 --out "$OUT" 2>&1 | tee -a "$LOG" ;;
    tune)
      report=$(compgen -G "$OUT/moe-*.json" | head -1)
      left=$((LIMIT_S - SECONDS - bench_s - 20))
      if [ -z "$report" ]; then echo "tune: no bench report in $OUT; run bench first" | tee -a "$LOG"; continue; fi
      if [ "$left" -lt 60 ]; then echo "tune: only ${left} s left before rebench; skipped" | tee -a "$LOG"; continue; fi
      python3 benchmarks/tune_moe.py --from-bench "$report" --out "$TUNED" --stop-after-s "$left" 2>&1 | tee -a "$LOG"
      ;;
    rebench)
      if ! compgen -G "$TUNED/*.json" >/dev/null; then echo "rebench: no tuned table; skipped" | tee -a "$LOG"; continue; fi
      cp "$TUNED"/*.json "$OUT/tuned.json"
      MIXTRAL_MOE_CONFIG_DIR="$TUNED" python3 benchmarks/moe_kernel.py --out "$OUT/after-tune" 2>&1 | tee -a "$LOG"
      ;;
    *) echo "unknown phase $step (tests | bench | tune | rebench)" >&2; exit 2 ;;
  esac
  rc=${PIPESTATUS[0]}
  [ "$step" = bench ] && bench_s=$((SECONDS - started))
  echo "== $step: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/gpu.txt" "$LOG"
  [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
