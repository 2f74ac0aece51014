#!/usr/bin/env bash
# One GPU run for the Mamba-2 kernels (under 8 minutes on an H200, from a fresh checkout, no network):
#   1. bench: the Triton SSD forward and forward+backward at B=8, L=2048, 32 heads x 64, N=128, bf16, every
#      configuration of triton_ssd.BENCH_CONFIGS, beside upstream's mamba_chunk_scan_combined when its sdist is
#      found (UPSTREAM_SRC, default [../]shared/anchors/mamba_ssm-2.3.2.post1.tar.gz; needs einops), plus the
#      plugin's Mamba-2 CUDA kernels (decode step, sequence scan)             -> $OUT/ssd_bench.json, bench.log
#   2. tests, four pytest processes side by side (Triton compiles are CPU-bound; the GPU is shared):
#      tests/test_triton_ssd_gpu.py split by dtype, and the plugin kernels tests/test_ssd_kernels_gpu.py +
#      tests/test_plugin_kernels_gpu.py (the Mamba-1 kernels share kernel_common.cuh)
#      -> $OUT/tests_*.log, triton_ssd_errors_*.json, ssd_kernel_errors.json, plugin_kernel_errors.json
# The plugin library is built once for sm_90 only (make -C plugins ARCHS=90), ~20 s instead of ~1 min.
#   OUT=/tmp/o bash scripts/gpu_mamba2_check.sh
#   STAGES=tests OUT=/tmp/o bash scripts/gpu_mamba2_check.sh         # stages: bench,tests (default both)
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_mamba2_out}
mkdir -p "$OUT"
STAGES=${STAGES:-bench,tests}
UPSTREAM_SRC=${UPSTREAM_SRC:-$(ls shared/anchors/mamba_ssm-2.3.2.post1.tar.gz ../shared/anchors/mamba_ssm-2.3.2.post1.tar.gz 2>/dev/null | head -1)}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
has() { case ",$STAGES," in *",$1,"*) return 0;; *) return 1;; esac; }
T0=$(date +%s)

{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log --oneline -1 2>/dev/null
} 2>&1 | tee "$OUT/gpu.txt"

echo "== plugin library (sm_90)"
LIBDIR=$(mktemp -d)
if make -C plugins ARCHS=90 OUT="$LIBDIR/libmamba_scan.so" > "$OUT/nvcc.log" 2>&1; then
  export MAMBA_DEPLOY_SCAN_LIB=$LIBDIR/libmamba_scan.so
else
  echo "nvcc build failed (see nvcc.log); the plugin tests will try the package build"; tail -20 "$OUT/nvcc.log"
fi
echo "   $(( $(date +%s) - T0 )) s"

if has bench; then
  echo "== bench"
  UP=()
  [ -f "$UPSTREAM_SRC" ] || [ -d "$UPSTREAM_SRC" ] && UP=(--upstream-src "$UPSTREAM_SRC")
  timeout 330 python3 scripts/bench_ssd.py --out "$OUT/ssd_bench.json" --plugin "${UP[@]}" 2>&1 | tee "$OUT/bench.log" | tail -40
  echo "   $(( $(date +%s) - T0 )) s"
fi

if has tests; then
  echo "== tests (4 processes)"
  run() {  # name, pytest args...
    local name=$1; shift
    timeout 300 python3 -m pytest -q -rs -p no:cacheprovider "$@" > "$OUT/tests_$name.log" 2>&1
    echo "$name: rc=$? $(tail -1 "$OUT/tests_$name.log")"
  }
  MAMBA_DEPLOY_GPU_REPORT=$OUT/triton_ssd_errors_fp32.json run triton_fp32 tests/test_triton_ssd_gpu.py -k "fp32 or long or final_state" &
  MAMBA_DEPLOY_GPU_REPORT=$OUT/triton_ssd_errors_bf16.json run triton_bf16 tests/test_triton_ssd_gpu.py -k "bf16 and not long" &
  MAMBA_DEPLOY_GPU_REPORT=$OUT/triton_ssd_errors_other.json run triton_other tests/test_triton_ssd_gpu.py -k "fp16 or bench_config" &
  MAMBA_DEPLOY_GPU_REPORT_SSD=$OUT/ssd_kernel_errors.json MAMBA_DEPLOY_GPU_REPORT=$OUT/plugin_kernel_errors.json \
    run plugin_kernels tests/test_ssd_kernels_gpu.py tests/test_plugin_kernels_gpu.py &
  wait
  grep -h -E "^(FAILED|ERROR)|Error" "$OUT"/tests_*.log | head -40
  echo "   $(( $(date +%s) - T0 )) s"
fi
