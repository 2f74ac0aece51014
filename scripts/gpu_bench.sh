#!/usr/bin/env bash
# The single script for a GPU run of the decode fast path and the benchmark. Stages (STAGES, comma
# separated, default all): tests (GPU tests of torch-fast), profile (scripts/profile_decode.py), bench
# (mamba-deploy bench, 370m random fp16, batches 1,8,64, prompt 2048). Everything lands under $OUT (at most 8
# files come back from the device machine): gpu.txt, tests.log, profile.json, profile.log, bench.json,
# bench.png, bench.log. Stages run in the order bench, tests, profile (the benchmark first: a run cut short
# keeps it).
#   OUT=/tmp/o bash scripts/gpu_bench.sh
#   ORT_SITE=/tmp/ortsite BACKENDS=torch-fast,onnxruntime,torch bash scripts/gpu_bench.sh   # onnxruntime-gpu too
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT"
STAGES=${STAGES:-tests,bench,profile}
PROFILE_ARGS=${PROFILE_ARGS:-}          # e.g. --quick
BUDGET_S=${BUDGET_S:-40}                # seconds per backend x batch (fewer repetitions when slow)
BACKENDS=${BACKENDS:-torch-fast,torch}
BATCHES=${BATCHES:-1,8,64}
# PYTEST_ARGS: extra pytest arguments, e.g. -k "not interpreter" (the CPU interpreter test also runs in CI)
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'from mamba_deploy.devices import require_cuda; require_cuda("scripts/gpu_bench.sh")' || exit 2
if [ -n "$ORT_SITE" ]; then
  export PYTHONPATH=$ORT_SITE:$PYTHONPATH
  # onnxruntime-gpu finds CUDA 13 / cuDNN 9 in the nvidia-* wheels that torch brought
  NV=$(python3 -c "import nvidia, os, glob; print(':'.join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'lib')))))")
  export LD_LIBRARY_PATH=$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
has() { case ",$STAGES," in *",$1,"*) return 0;; *) return 1;; esac; }

{ date -u; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())" 2>&1 | tail -1
} 2>&1 | tee "$OUT/gpu.txt"

if has bench; then
  echo "== bench"
  python3 -c 'from mamba_deploy.cli import main; main()' bench --random 370m --backend "$BACKENDS" --batch "$BATCHES" \
    --prompt-len 2048 --gen-len 128 --reps 5 --budget-s "$BUDGET_S" --dtype fp16 --json "$OUT/bench.json" \
    --plot "$OUT/bench.png" 2>&1 | tr '\r' '\n' | grep -v "batches:" | tee "$OUT/bench.log"
fi
if has tests; then
  echo "== tests"; python3 -m pytest -q -rs -s tests/test_fast_session_gpu.py tests/test_triton_scan.py ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | grep -E "batch|passed|failed|Error|error|assert" | tail -30
fi
if has profile; then
  echo "== profile"; python3 scripts/profile_decode.py $PROFILE_ARGS --out "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log"
fi
