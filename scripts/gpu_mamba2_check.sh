#!/usr/bin/env bash
# One GPU run for the Mamba-2 kernels (about 6 minutes on an H200, from a fresh checkout, no network).
# Stage "tests" (parallel processes: Triton compiles are CPU-bound, the GPU has room):
#   - tests/test_triton_ssd_gpu.py split in three by dtype          -> tests_triton_*.log, triton_ssd_errors_*.json
#   - the plugin library built once for sm_90 (make -C plugins ARCHS=90), then tests/test_ssd_kernels_gpu.py and
#     tests/test_plugin_kernels_gpu.py (the Mamba-1 kernels share kernel_common.cuh)
#                                                  -> tests_plugin_kernels.log, ssd_kernel_errors.json, nvcc.log
#   - with upstream's sdist found: ours vs upstream mamba_chunk_scan_combined on y, the final state and every
#     gradient, fp32 and bf16 (scripts/check_ssd_vs_upstream.py)   -> vs_upstream_{fp32,bf16}.json
# Stage "bench" (alone on the GPU): scripts/bench_ssd.py --plugin: the Triton SSD forward and forward+backward at
#   B=8, L=2048, 32 heads x 64, N=128, bf16, every configuration of triton_ssd.BENCH_CONFIGS, upstream's Triton
#   SSD at chunk 64 and 256 in the same run, per-kernel times, and the plugin kernels  -> ssd_bench.json, bench.log
# Upstream's sdist: UPSTREAM_SRC, else [../]shared/anchors/mamba_ssm-2.3.2.post1.tar.gz (216 KB; needs einops).
#   OUT=/tmp/o bash scripts/gpu_mamba2_check.sh
#   STAGES=bench OUT=/tmp/o bash scripts/gpu_mamba2_check.sh          # stages: tests,bench (default both)
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_mamba2_out}
mkdir -p "$OUT"
STAGES=${STAGES:-tests,bench}
UPSTREAM_SRC=${UPSTREAM_SRC:-$(ls shared/anchors/mamba_ssm-2.3.2.post1.tar.gz ../shared/anchors/mamba_ssm-2.3.2.post1.tar.gz 2>/dev/null | head -1)}
UP=()
[ -n "$UPSTREAM_SRC" ] && { [ -f "$UPSTREAM_SRC" ] || [ -d "$UPSTREAM_SRC" ]; } && UP=(--upstream-src "$UPSTREAM_SRC")
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'from mamba_deploy.devices import require_cuda; require_cuda("scripts/gpu_mamba2_check.sh")' || exit 2
has() { case ",$STAGES," in *",$1,"*) return 0;; *) return 1;; esac; }
T0=$(date +%s)
elapsed() { echo "   $(( $(date +%s) - T0 )) s"; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import einops; print('einops', einops.__version__)" 2>&1 | tail -1
  echo "upstream sdist: ${UPSTREAM_SRC:-not found}"
  git log --oneline -1 2>/dev/null
} 2>&1 | tee "$OUT/gpu.txt"

if has tests; then
  echo "== tests (parallel)"
  run() {  # name, pytest args...
    local name=$1; shift
    timeout 270 python3 -m pytest -q -rs -p no:cacheprovider "$@" > "$OUT/tests_$name.log" 2>&1
    echo "$name: rc=$? $(tail -1 "$OUT/tests_$name.log")"
  }
  MAMBA_DEPLOY_GPU_REPORT=$OUT/triton_ssd_errors_fp32.json run triton_fp32 tests/test_triton_ssd_gpu.py -k "fp32 or long or final_state" &
  MAMBA_DEPLOY_GPU_REPORT=$OUT/triton_ssd_errors_bf16.json run triton_bf16 tests/test_triton_ssd_gpu.py -k "bf16 and not long" &
  MAMBA_DEPLOY_GPU_REPORT=$OUT/triton_ssd_errors_other.json run triton_other tests/test_triton_ssd_gpu.py -k "fp16 or bench_config" &
  (
    LIBDIR=$(mktemp -d)
    if make -C plugins ARCHS=90 OUT="$LIBDIR/libmamba_scan.so" > "$OUT/nvcc.log" 2>&1; then
      export MAMBA_DEPLOY_SCAN_LIB=$LIBDIR/libmamba_scan.so
    else
      echo "nvcc build for sm_90 failed (nvcc.log); the plugin tests build the package's library instead"
    fi
    MAMBA_DEPLOY_GPU_REPORT_SSD=$OUT/ssd_kernel_errors.json MAMBA_DEPLOY_GPU_REPORT=$OUT/plugin_kernel_errors.json \
      run plugin_kernels tests/test_ssd_kernels_gpu.py tests/test_plugin_kernels_gpu.py
  ) &
  if [ ${#UP[@]} -gt 0 ]; then
    (
      for dt in fp32 bf16; do
        timeout 200 python3 scripts/check_ssd_vs_upstream.py "${UP[@]}" --dtype $dt > "$OUT/vs_upstream_$dt.json" 2> "$OUT/vs_upstream_$dt.log"
        echo "vs upstream $dt: rc=$? $(tr -d '\n ' < "$OUT/vs_upstream_$dt.json" | grep -o '"rel_diff".*' | cut -c1-300)"
      done
    ) &
  fi
  wait
  grep -h -E "^(FAILED|ERROR)" "$OUT"/tests_*.log | head -40
  elapsed
fi

if has bench; then
  echo "== bench"
  timeout 210 python3 scripts/bench_ssd.py --out "$OUT/ssd_bench.json" --plugin "${UP[@]}" 2>&1 | tee "$OUT/bench.log" | tail -30
  elapsed
fi
