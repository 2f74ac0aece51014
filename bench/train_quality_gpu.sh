#!/usr/bin/env bash
# GPU quality run of `mamba-deploy train`: the paper's 2-layer d_model=64 Mamba on induction heads (trained
# at length 256, evaluated at 1024 through the parallel forward and at 4096 through model.step) and on selective
# copying (length 256; a second run at 1024), trained side by side as separate processes on one GPU, each with a
# wall-time budget (train.max_minutes: the cosine schedule follows elapsed time, so each ends with a decayed lr).
#
#   OUT=/tmp/q bash bench/train_quality_gpu.sh            # MINUTES=6.3 per run by default; RUNS to pick a subset
#
# What lands in $OUT (the device machine returns at most 8 files): log.txt, summaries.json, one curves PNG per run,
# runs.tar.gz (each run's config.toml, metrics.jsonl, summary.json and its final checkpoint).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/train_quality_out}
RUN_ROOT=${RUN_ROOT:-/tmp/train_quality_runs}
MINUTES=${MINUTES:-6.3}
PROC_TIMEOUT=${PROC_TIMEOUT:-480}   # seconds; leaves time for the summaries within a 540 s call
RUNS=${RUNS:-induction,induction-lr1e-3,copying,copying-1024}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}   # more `train` options for every run (a dry run on CPU: see the end of this file)
mkdir -p "$OUT" "$RUN_ROOT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ "$DEVICE" = cpu ] || python3 -c 'from mamba_deploy.devices import require_cuda; require_cuda("bench/train_quality_gpu.sh")' || exit 2
LOG="$OUT/log.txt"

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log --oneline -1 2>/dev/null; } 2>&1 | tee "$LOG"

# name → arguments of `mamba-deploy train`
declare -A ARGS=(
  [induction]="--config induction"
  [induction-lr1e-3]="--config induction --lr 1e-3 --seed 1"
  [copying]="--config copying"
  [copying-1024]="--config copying --seq-len 1024"
)
pids=()
for name in ${RUNS//,/ }; do
  args=${ARGS[$name]:?unknown run $name}
  echo "== $name: mamba-deploy train $args --set train.max_minutes=$MINUTES" | tee -a "$LOG"
  timeout $PROC_TIMEOUT python3 -m mamba_deploy.cli train $args --out "$RUN_ROOT/$name" --force --no-progress \
      --device $DEVICE --set train.max_minutes=$MINUTES $EXTRA > "$RUN_ROOT/$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; echo "exit $?" >> "$LOG"; done

for name in ${RUNS//,/ }; do
  echo "==== $name" >> "$LOG"
  cat "$RUN_ROOT/$name.log" >> "$LOG"
  [ -f "$RUN_ROOT/$name/curves.png" ] && cp "$RUN_ROOT/$name/curves.png" "$OUT/$name.png"
  # the final checkpoint is a valid --model
  ck=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$RUN_ROOT/$name/summary.json" 2>/dev/null) \
    && python3 -m mamba_deploy.cli info --model "$ck" >> "$LOG" 2>&1
done
python3 - "$RUN_ROOT" "$RUNS" > "$OUT/summaries.json" <<'EOF'
import json, sys, pathlib
root, names = pathlib.Path(sys.argv[1]), sys.argv[2].split(",")
out = {}
for n in names:
    p = root / n / "summary.json"
    out[n] = json.loads(p.read_text()) if p.exists() else None
print(json.dumps(out, indent=2))
EOF
cat "$OUT/summaries.json" | tee -a "$LOG"
# keep the final checkpoint of each run, the metrics and configs (not the intermediate checkpoints)
(cd "$RUN_ROOT" && for name in ${RUNS//,/ }; do
   ls -d $name/config.toml $name/metrics.jsonl $name/summary.json 2>/dev/null
   ls -d $name/checkpoints/step-* 2>/dev/null | tail -n 1
 done | xargs tar czf "$OUT/runs.tar.gz")
date -u | tee -a "$LOG"

# Dry run of this script on a CPU (minutes, tiny evaluations):
#   OUT=/tmp/q DEVICE=cpu MINUTES=0.3 RUNS=induction,copying EXTRA="--seq-len 64 --set eval.samples=16 \
#     --set eval.step_samples=4 --set eval.step_lengths=[80] --set eval.lengths=[64] --set eval.every=20" \
#     bash bench/train_quality_gpu.sh
