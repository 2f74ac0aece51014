#!/usr/bin/env bash
# Before/after benchmark of torch-fast on ONE machine in ONE run: `mamba-deploy bench` (370m random, fp16, decode
# b=1/8/64, prefill 2,048) of two source trees, interleaved old, new, old, new … so that drift of the machine hits
# both alike; then each side's figures (median over its rounds) side by side with the change in %.
#   OUT=/tmp/o ROUNDS=2 bash scripts/gpu_ab_bench.sh OLD_TREE NEW_TREE
# Writes $OUT/bench_{old,new}_<round>.json and $OUT/ab.txt (the table, over every bench_*.json in $OUT: a second
# call with FIRST_ROUND=2 adds rounds). BATCHES, BENCH_TIMEOUT_S override.
set -o pipefail
python3 -c 'from mamba_deploy.devices import require_cuda; require_cuda("scripts/gpu_ab_bench.sh")' || exit 2
OLD=$(cd "$1" && pwd) NEW=$(cd "$2" && pwd)
OUT=${OUT:-/tmp/gpu_ab_out}
ROUNDS=${ROUNDS:-2}
FIRST_ROUND=${FIRST_ROUND:-1}
BATCHES=${BATCHES:-1,8,64}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
for r in $(seq "$FIRST_ROUND" $((FIRST_ROUND + ROUNDS - 1))); do
  for side in old new; do
    tree=$OLD; [ $side = new ] && tree=$NEW
    echo "== round $r $side ($tree)"
    (cd "$tree" && PYTHONPATH=$tree timeout "${BENCH_TIMEOUT_S:-240}" python3 -m mamba_deploy.cli bench --random 370m \
      --backend torch-fast --batch "$BATCHES" --prompt-len 2048 --gen-len 128 --reps 5 --dtype fp16 \
      --json "$OUT/bench_${side}_$r.json") 2>&1 | tr '\r' '\n' | grep -v "batches:" | tail -8
  done
done
python3 - "$OUT" <<'PY' | tee "$OUT/ab.txt"
import glob, json, statistics, sys
out = sys.argv[1]
fig = {}                                   # (side, batch, metric) -> [values over rounds]
for side in ("old", "new"):
    for path in sorted(glob.glob(f"{out}/bench_{side}_*.json")):
        for row in json.load(open(path))["rows"]:
            for metric in ("decode_ms_per_step", "prefill_ms"):
                if row.get(metric):
                    fig.setdefault((side, row["batch"], metric), []).append(row[metric])
print(f"{'figure':28s} {'old (median)':>14s} {'new (median)':>14s} {'change':>8s}   rounds old / new")
for metric in ("decode_ms_per_step", "prefill_ms"):
    for b in sorted({k[1] for k in fig}):
        o, n = fig.get(("old", b, metric)), fig.get(("new", b, metric))
        if not (o and n):
            continue
        mo, mn = statistics.median(o), statistics.median(n)
        print(f"{metric + ' b=' + str(b):28s} {mo:14.4f} {mn:14.4f} {100 * (mn / mo - 1):+7.1f}%   "
              f"{[round(x, 4) for x in o]} / {[round(x, 4) for x in n]}")
PY
