#!/usr/bin/env bash
# Multi-GPU scaling of main.py through torchrun, on Fashion-MNIST resized to 224 (bf16 autocast).
# For each model: 1 GPU x batch B and 2 GPUs x batch B (weak scaling: images/s ratio), and
# 1 GPU x batch 2B against 2 GPUs x batch B (equal global batch: the losses must match).
#
#   bash benchmarks/ddp_scaling.sh DATA_DIR OUT_DIR [STEPS] [BATCH] [MODELS...]
# DATA_DIR holds the Fashion-MNIST idx files; each run's log.txt goes to OUT_DIR/<model>-<run>.
# EXTRA_ARGS are added to every run (e.g. "--use_sync_bn true": BN models only match the
# 1-GPU loss with SyncBN, which costs speed).
set -euo pipefail
data=$1
out=$2
steps=${3:-100}
batch=${4:-64}
shift 4 || shift $#
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(unireplknet_t RepLKNet-31B)

common=(--data_set fashion_mnist --data_path "$data" --input_size 224 --epochs 1
        --disable_eval true --use_amp true --amp_dtype bfloat16 --num_workers 12
        --aa none --reprob 0 --color_jitter 0 --mixup 0 --cutmix 0 --smoothing 0
        --drop_path 0 --warmup_epochs 0 --lr 1e-4 --save_ckpt false ${EXTRA_ARGS:-})

run() {  # name nproc per_gpu_batch model
  local dir="$out/$4-$1"
  mkdir -p "$dir"
  torchrun --standalone --nproc_per_node "$2" main.py --model "$4" --batch_size "$3" \
    --train_subset $((steps * 2 * batch)) --output_dir "$dir" "${common[@]}" \
    > "$dir/stdout.txt" 2>&1 || { tail -30 "$dir/stdout.txt"; return 1; }
  grep -h "Training throughput" "$dir/stdout.txt"
}

for model in "${models[@]}"; do
  echo "== $model"
  run 1gpu-b"$batch" 1 "$batch" "$model"
  run 1gpu-b$((2 * batch)) 1 $((2 * batch)) "$model"
  run 2gpu-b"$batch" 2 "$batch" "$model"
  python3 - "$out" "$model" "$batch" <<'EOF'
import json, sys
out, model, b = sys.argv[1], sys.argv[2], int(sys.argv[3])
stats = {}
for run in (f"1gpu-b{b}", f"1gpu-b{2 * b}", f"2gpu-b{b}"):
    with open(f"{out}/{model}-{run}/log.txt") as f:
        stats[run] = json.loads(f.readlines()[-1])
one, big, two = stats[f"1gpu-b{b}"], stats[f"1gpu-b{2 * b}"], stats[f"2gpu-b{b}"]
print(f"{model}: images/s 1 GPU (b{b}) {one['train_images_per_sec']:.1f}, "
      f"2 GPUs (b{b} each) {two['train_images_per_sec']:.1f}, "
      f"scaling {two['train_images_per_sec'] / one['train_images_per_sec']:.3f}x")
print(f"{model}: mean train loss 1 GPU b{2 * b} {big['train_loss']:.6f} vs 2 GPUs b{b} "
      f"{two['train_loss']:.6f} (diff {abs(big['train_loss'] - two['train_loss']):.2e})")
EOF
done
