#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one call (run on a lent CUDA machine from the repo root; about
# 8 minutes on an H200). Every `prepretrain bench` line times the prepretrain step and the
# reference-style baseline in the same process; the last part runs MAE ViT-B end to end from JPEG
# shards through the engine, beside the baseline. Results go to $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'tv', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
bench() {  # one bench line, its table to the log, its JSON to bench.jsonl
  echo "== bench $*" | tee -a "$OUT/bench.log"
  timeout 150 $PY -m prepretrain.cli bench "$@" device=cuda > "$OUT/last.txt" 2>&1; echo "rc=$?" >> "$OUT/last.txt"
  grep -v '^{' "$OUT/last.txt" | tail -6 | tee -a "$OUT/bench.log"; grep '^{' "$OUT/last.txt" >> "$OUT/bench.jsonl"
}
bench mae model=vit_b16 batch_size=256 rounds=2
bench mae model=vit_l16 batch_size=256 rounds=2
bench wsp model=vit_l16 batch_size=256 num_classes=28000
bench wsp model=vit_h14 batch_size=128 num_classes=28000
bench finetune model=vit_b16 batch_size=256
bench video model=vit_b16 batch_size=16 num_frames=16 tubelet_size=2
bench detect model=vit_b16 batch_size=8 image_size=1024 window_size=14 pyramid_channels=256
timeout 120 $PY -m prepretrain.cli bench lit model=vit_l16 text_model=xlmr_base image_size=224 batch_size=256 \
  device=cuda precision=bf16 >> "$OUT/bench.log" 2>&1
timeout 100 $PY -m prepretrain.cli bench data num_images=384 batch_size=128 repeats=2 >> "$OUT/bench.log" 2>&1
# Host syncs left inside training steps (CUDA's sync debug mode; tests check Python-level reads on the CPU)
timeout 150 $PY benchmarks/sync_check.py --out "$OUT/sync_check" 2>&1 | grep -v Warning | tail -24 | tee -a "$OUT/bench.log"
rm -rf "$OUT/sync_check"
# End to end: 2048 real JPEGs (224-500 px) as shards, MAE ViT-B/16 through the engine, both paths.
timeout 90 $PY -m prepretrain.cli data rehearsal --out "$OUT/rehearsal" --num-images 2048 > /dev/null 2>&1
timeout 240 $PY -m prepretrain.cli bench mae --end-to-end --out "$OUT/e2e" "data=$OUT/rehearsal/data/pretrain" \
  model=vit_b16 image_size=224 batch_size=256 steps=40 log_every=5 warmup_steps=0 num_workers=12 decode=gpu \
  eval_images=256 device=cuda tensorboard=false 2>&1 | tee -a "$OUT/bench.log" | tail -4
rm -rf "$OUT"/e2e/*/checkpoints "$OUT"/e2e/*/*.safetensors "$OUT/rehearsal"
