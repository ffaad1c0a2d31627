#!/usr/bin/env bash
# The Terabyte-size DLRM (DLRM's Terabyte tables, --max-ind-range 10M: 49,126,297 rows x 64 = 12.58 GB in FP32) on
# synthetic Terabyte-preset data: 1,000 training steps (batch 2048) of whole-model INT4 QAT with FP32 and with FP16
# master tables, checkpointing on (best.ckpt and last.ckpt), then `dqrm export` and `dqrm predict` with the INT4
# artifact; GNU time's peak RSS and wall time of each command.
#
#   bash benchmarks/terabyte_memory.sh DATA_DIR WORK_DIR     # DATA_DIR made once: needs ~40 GB of disk in WORK_DIR
set -euo pipefail
data=${1:?DATA_DIR}
work=${2:?WORK_DIR}
dqrm=(python -m dqrm_lightning.cli)
if [ ! -f "$data/truth.json" ]; then
  "${dqrm[@]}" data synth --preset terabyte --rows 2200000 --seed 0 --split 0.95 0.025 0.025 --out "$data"
fi
files=(--data.train_files "$data/train.tsv" --data.val_files "$data/val.tsv" --data.test_files "$data/test.tsv")
configs=(-c configs/terabyte.yaml -c configs/data/synthetic_terabyte.yaml)
for dtype in ${DTYPES:-fp32 fp16}; do
  run="$work/$dtype"
  rm -rf "$run"
  mkdir -p "$run"
  /usr/bin/time -v -o "$run/fit.time" "${dqrm[@]}" fit "${configs[@]}" -c configs/qat/int4.yaml \
    --model.table_dtype "$dtype" "${files[@]}" --trainer.max_epochs 1 --trainer.limit_train_batches 1000 \
    --trainer.log_every_n_steps 100 --trainer.default_root_dir "$run" --wandb disabled \
    --trainer.enable_progress_bar false >"$run/fit.log" 2>&1
  checkpoint=$(ls "$run"/lightning_logs/version_*/checkpoints/best.ckpt | head -n 1)
  /usr/bin/time -v -o "$run/export.time" "${dqrm[@]}" export --ckpt "$checkpoint" --out "$run/model.dqrm" \
    >"$run/export.log" 2>&1
  /usr/bin/time -v -o "$run/predict.time" "${dqrm[@]}" predict "${configs[@]}" "${files[@]}" \
    --artifact "$run/model.dqrm" --trainer.default_root_dir "$run/predict" --wandb disabled \
    --trainer.enable_progress_bar false >"$run/predict.log" 2>&1
  rm -f "$run"/lightning_logs/version_*/checkpoints/*.ckpt  # 2 x 12.6 GB (FP32) of disk
  for step in fit export predict; do
    peak=$(awk -F': ' '/Maximum resident/ {print $2}' "$run/$step.time")
    wall=$(awk -F': ' '/Elapsed \(wall/ {print $2}' "$run/$step.time")
    echo "$dtype $step: peak RSS $(awk -v k="$peak" 'BEGIN {printf "%.2f", k / 1e6}') GB, wall $wall"
  done
  tail -n 1 "$run/fit.log"
done
