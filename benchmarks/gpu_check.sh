#!/usr/bin/env bash
# GPU validation of the input pipeline and the fast paths (issue 15), for one H100/H200, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]             # on the GPU machine (default OUT_DIR: gpu_check_out)
#   bash benchmarks/gpu_check.sh --dry_run [OUT_DIR]   # the same steps on the CPU with tiny models and data
#
# Steps (each one's output goes to OUT_DIR/<step>.log, JSON where the tool writes it, a summary to summary.txt):
#   1. bench_train.py: mae_vit_base_patch16 and chamae_vit_base_patch16 at C = 3/5/8, bf16 and fp16, eager; compiled
#      at C = 5 (both models bf16, ChannelMAE fp16) (img/s, peak memory, MFU, SDPA kernel, host syncs)
#   2. the fast paths' effect: chamae C = 5 bf16 with --no_fast_paths (cudnn.benchmark, fused AdamW), fp32 with
#      and without them (TF32)
#   3. bench_data.py on this machine's cores: compressed TIFF, packed, packed + device augmentation
#   4. main_pretrain.py on a packed store with --gpu_augment, ~300 steps: share of step time spent waiting for data
#   5. torchrun, one process (NCCL on CUDA), --compile under DDP, --gpu_augment
#   6. the fp16 loss check of tests/test_precision.py on the device (more decoded tokens than fp16 can count)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=gpu_check_out
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY=1 ;;
    *) OUT="$arg" ;;
  esac
done
mkdir -p "$OUT"
PY=${PYTHON:-python}
CORES=$(nproc)
WORKERS=$((CORES > 1 ? CORES - 1 : 1))

if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16
  DEVICE=cpu
  SIZE=(--input_size 32 --batch_size 2 --steps 1 --warmup 0 --patch_size 8 --embed_dim 32 --depth 1 --num_heads 2
    --decoder_embed_dim 32 --decoder_depth 1 --decoder_num_heads 2)
  CHANNELS=(3)
  AMPS=(bf16)
  COMPILE=()
  DATA=(--samples 8 --field 96 --input_size 32 --batch_size 4 --workers 0 1 --repeats 1 --seconds 0.3)
  PRETRAIN=(--input_size 32 --patch_size 8 --batch_size 4 --epochs 2 --num_workers 1 --amp none
    --model_kwargs depth=1 embed_dim=32 num_heads=2 decoder_embed_dim=32 decoder_depth=1 decoder_num_heads=2)
  TORCHRUN=()
else
  DEVICE=cuda
  SIZE=(--input_size 224 --batch_size 64 --steps 10 --warmup 3)
  CHANNELS=(3 5 8)
  AMPS=(bf16 fp16)
  COMPILE=(--compile)
  DATA=(--samples 512 --field 1080 --input_size 224 --batch_size 64 --workers 0 "$WORKERS" --repeats 3 --seconds 4)
  PRETRAIN=(--model chamae_vit_base_patch16 --input_size 224 --batch_size 64 --epochs 38 --num_workers "$WORKERS"
    --amp bf16 --blr 1.5e-4)
  TORCHRUN=(--compile)
fi
MODELS=(mae_vit_base_patch16 chamae_vit_base_patch16)
DATA_DIR="$OUT/data"

step() {  # step NAME CMD...: run, log, and record the status and duration in summary.txt
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  return 0
}

: >"$OUT/summary.txt"
echo "device $DEVICE, $CORES cores, dry run $DRY, $(date -u +%FT%TZ)" | tee -a "$OUT/summary.txt"
for amp in "${AMPS[@]}"; do
  step "train_${amp}_eager" $PY benchmarks/bench_train.py --models "${MODELS[@]}" --channels "${CHANNELS[@]}" \
    --amp "$amp" --device $DEVICE "${SIZE[@]}" --json "$OUT/train_${amp}_eager.json"
done
step train_bf16_compiled $PY benchmarks/bench_train.py --models "${MODELS[@]}" --channels "${CHANNELS[1]:-3}" \
  --amp bf16 --device $DEVICE "${SIZE[@]}" "${COMPILE[@]}" --json "$OUT/train_bf16_compiled.json"
step train_fp16_compiled $PY benchmarks/bench_train.py --models chamae_vit_base_patch16 --channels "${CHANNELS[1]:-3}" \
  --amp fp16 --device $DEVICE "${SIZE[@]}" "${COMPILE[@]}" --json "$OUT/train_fp16_compiled.json"
step train_bf16_no_fast_paths $PY benchmarks/bench_train.py --models chamae_vit_base_patch16 \
  --channels "${CHANNELS[1]:-3}" --amp bf16 --device $DEVICE "${SIZE[@]}" --no_fast_paths \
  --json "$OUT/train_bf16_no_fast_paths.json"
for fast in "" --no_fast_paths; do
  step "train_fp32${fast:+_no_fast_paths}" $PY benchmarks/bench_train.py --models chamae_vit_base_patch16 \
    --channels "${CHANNELS[1]:-3}" --amp none --device $DEVICE "${SIZE[@]}" $fast \
    --json "$OUT/train_fp32${fast:+_no_fast_paths}.json"
done

step data $PY benchmarks/bench_data.py --data_dir "$DATA_DIR" --device $DEVICE "${DATA[@]}" \
  --runs tiff_zlib:cpu packed:cpu packed:device --json "$OUT/data.json"
grep -h "^| " "$OUT/data.log" >>"$OUT/summary.txt"

step pretrain_packed $PY main_pretrain.py --device $DEVICE --data_path "$DATA_DIR/packed" --gpu_augment \
  --output_dir "" --print_freq 1 --vis_every 0 "${PRETRAIN[@]}"
$PY - "$OUT/pretrain_packed.log" <<'EOF' | tee -a "$OUT/summary.txt"
import re, sys
steps = [tuple(map(float, m)) for m in re.findall(r"time: ([\d.]+)\s+data: ([\d.]+)", open(sys.argv[1]).read())]
if steps:  # printed values are running averages over the last 20 steps of each epoch
    total, data = sum(t for t, _ in steps), sum(d for _, d in steps)
    print(f"pretrain_packed: {len(steps)} steps logged, waiting for data {100 * data / total:.1f}% of step time")
else:
    print("pretrain_packed: no step lines in the log")
EOF

step torchrun $PY -m torch.distributed.run --standalone --nproc_per_node 1 main_pretrain.py --device $DEVICE \
  --data_path "$DATA_DIR/packed" --gpu_augment --output_dir "$OUT/torchrun" --vis_every 0 \
  "${PRETRAIN[@]}" --epochs 1 "${TORCHRUN[@]}"
grep -h "distributed init" "$OUT/torchrun.log" | head -1 | tee -a "$OUT/summary.txt"

step fp16_loss env DEVICE=$DEVICE $PY - <<'EOF'
import os, torch
import models_chamae
from util.amp import autocast
device = torch.device(os.environ["DEVICE"])
tiny = dict(embed_dim=8, depth=1, num_heads=1, mlp_ratio=1.0, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=1)
torch.manual_seed(0)
imgs = torch.randn(1400, 4, 16, 16, device=device)
for decoder in ("full", "cross"):
    torch.manual_seed(1)
    model = models_chamae.create_model("chamae_vit_tiny_patch16", img_size=16, patch_size=4, in_chans=4,
                                       decoder=decoder, **tiny).to(device)
    losses = {}
    for amp in ("none", "fp16", "bf16"):
        torch.manual_seed(2)
        with torch.no_grad(), autocast(device, amp):
            losses[amp] = float(model(imgs, mask_ratio=0.75)[0])
    ok = all(abs(losses[a] - losses["none"]) <= 0.01 * losses["none"] for a in ("fp16", "bf16"))
    print(f"fp16 loss check {decoder} decoder on {device}: {losses} -> {'ok' if ok else 'FAILED'}")
    assert ok and losses["none"] > 0
EOF
grep -h "fp16 loss check" "$OUT/fp16_loss.log" | tee -a "$OUT/summary.txt"
echo "done in $SECONDS s" | tee -a "$OUT/summary.txt"
