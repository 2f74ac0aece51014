#!/usr/bin/env bash
# Data-parallel scaling of `mamba-deploy train`: tokens/s on 1 GPU vs 2 GPUs (torchrun + DDP, NCCL), same
# per-GPU batch, each run limited to MINUTES of wall time, on a byte-level text corpus made from this repository's
# sources. Model: a 130m-like shape with a byte vocabulary (d_model 768, 24 layers), seq 1024, batch 8 per GPU.
#
#   OUT=/tmp/ddp bash bench/train_ddp_gpu.sh          # needs 2 GPUs; writes ddp.json, ddp_loss.png, log.txt
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/train_ddp_out}
RUN_ROOT=${RUN_ROOT:-/tmp/train_ddp_runs}
MINUTES=${MINUTES:-1.0}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}   # more `train` options (a CPU dry run: DEVICE=cpu MINUTES=0.2 EXTRA="--set model.d_model=32 --set model.n_layer=1 --seq-len 64")
mkdir -p "$OUT" "$RUN_ROOT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ "$DEVICE" = cpu ] || python3 -c 'from mamba_deploy.devices import require_cuda; require_cuda("bench/train_ddp_gpu.sh")' || exit 2
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # no NVLink multicast
LOG="$OUT/log.txt"
{ date -u; nvidia-smi --query-gpu=name,memory.total --format=csv; python3 -c "import torch; print('gpus', torch.cuda.device_count())"; } 2>&1 | tee "$LOG"

CORPUS=$RUN_ROOT/corpus.txt
find . -name '*.py' -o -name '*.md' -o -name '*.toml' | grep -v '^./\.' | sort | xargs cat > "$RUN_ROOT/one.txt"
for i in $(seq 1 8); do cat "$RUN_ROOT/one.txt"; done > "$CORPUS"
ls -l "$CORPUS" | tee -a "$LOG"

COMMON=(train --config text-small --data "$CORPUS" --set model.d_model=768 --set model.n_layer=24 --seq-len 1024
        --batch-size 8 --set train.max_steps=1000000 --set train.max_minutes=$MINUTES --set train.log_every=10
        --set eval.every=1000000 --set eval.samples=64 --set eval.batch_size=8 --set train.checkpoint_every=1000000
        --force --no-progress --device $DEVICE $EXTRA)
echo "== 1 GPU: python3 -m mamba_deploy.cli ${COMMON[*]} --out $RUN_ROOT/gpu1" | tee -a "$LOG"
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m mamba_deploy.cli "${COMMON[@]}" --out "$RUN_ROOT/gpu1" 2>&1 | tee -a "$LOG"
echo "== 2 GPUs: torchrun --standalone --nproc_per_node 2 -m mamba_deploy.cli ${COMMON[*]} --out $RUN_ROOT/gpu2" | tee -a "$LOG"
timeout 240 torchrun --standalone --nproc_per_node 2 -m mamba_deploy.cli "${COMMON[@]}" --out "$RUN_ROOT/gpu2" 2>&1 | tee -a "$LOG"

python3 - "$RUN_ROOT" "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, statistics, sys, pathlib
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
res, fig = {}, plt.figure(figsize=(11, 4))
ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
for name in ("gpu1", "gpu2"):
    rows = [json.loads(l) for l in (root / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    info = next(r for r in rows if r["kind"] == "info")
    steady = train[2:] or train  # drop the windows with compilation / warm-up
    res[name] = {"world_size": info["world_size"], "scan_backend": info["scan_backend"],
                 "tokens_per_step": info["tokens_per_step"], "steps": train[-1]["step"],
                 "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steady),
                 "final_train_loss": train[-1]["loss"],
                 "final_eval": json.loads((root / name / "summary.json").read_text()).get("eval")}
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{info['world_size']} GPU")
    ax2.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], label=f"{info['world_size']} GPU")
res["speedup"] = res["gpu2"]["tokens_per_s_median"] / res["gpu1"]["tokens_per_s_median"]
for ax, xl in ((ax1, "step"), (ax2, "tokens (M)")):
    ax.set_xlabel(xl); ax.set_ylabel("train loss (bytes)"); ax.set_yscale("log"); ax.grid(alpha=0.3); ax.legend()
fig.suptitle(f"DDP: 2 GPUs {res['speedup']:.2f}x the tokens/s of 1")
fig.tight_layout(); fig.savefig(out / "ddp_loss.png", dpi=110)
(out / "ddp.json").write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
EOF
date -u | tee -a "$LOG"
