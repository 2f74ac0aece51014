#!/usr/bin/env bash
# ONNX Runtime CUDA EP parity on a GPU machine: the IO-binding session test and `mamba-deploy check --device cuda`
# on a 130m-shaped random model (fp32 and fp16 artifacts). Needs onnxruntime-gpu importable: ORT_SITE=DIR puts an
# unpacked onnxruntime-gpu first on the path (the nvidia-* wheels that torch brought provide CUDA/cuDNN).
#   OUT=/tmp/o ORT_SITE=/tmp/ortsite bash scripts/gpu_ort_cuda_check.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ort_cuda_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'from mamba_deploy.devices import require_cuda; require_cuda("scripts/gpu_ort_cuda_check.sh")' || exit 2
if [ -n "$ORT_SITE" ]; then export PYTHONPATH=$ORT_SITE:$PYTHONPATH; fi
NV=$(python3 -c "import nvidia, os, glob; print(':'.join(sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'lib')))))")
export LD_LIBRARY_PATH=$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
md() { python3 -c 'from mamba_deploy.cli import main; main()' "$@"; }
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" | tee "$OUT/env.txt"
python3 -m pytest -q -rs tests/test_ort_session.py -k cuda 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5
md random --size 130m --out /tmp/r130 --force >/dev/null
for dt in fp32 fp16; do
  md export --model /tmp/r130 --out /tmp/r130-$dt --dtype $dt --force >/dev/null 2>&1
  echo "== check $dt (onnxruntime CUDA EP vs fp32 torch)"
  md check --artifact /tmp/r130-$dt --backends onnxruntime --device cuda --steps 32 --out /tmp/chk-$dt 2>&1 \
    | tee "$OUT/check_$dt.log" | grep -vE "^\s*$" | tail -14
  cp /tmp/chk-$dt/report.json "$OUT/check_$dt.json" 2>/dev/null
done
