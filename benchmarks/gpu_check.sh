#!/usr/bin/env bash
# One short GPU check (run on a lent CUDA machine from the repo root): model-step throughput and
# MFU for MAE ViT-B/16 and a supervised ViT-B/16 step, then an MAE ViT-B run through the real
# engine with FSDP2 + bf16 + torch.compile under torchrun. Results go to $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'tv', torchvision.__version__)" | tee -a "$OUT/gpu.txt"
for args in "mae model=vit_b16 batch_size=256" "vit model=vit_b16 batch_size=256" "mae model=vit_l16 batch_size=256"; do
  timeout 120 $PY -m prepretrain.cli bench $args device=cuda precision=bf16 steps=10 warmup=3 | tee -a "$OUT/bench.jsonl"
done
timeout 240 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m prepretrain.cli mae model=vit_b16 \
  image_size=224 strategy=fsdp precision=bf16 compile=true device=cuda batch_size=256 steps=30 ckpt_every=30 \
  num_images=8192 num_workers=14 warmup_steps=0 log_every=5 progress=false tensorboard=false out_dir=$OUT/fsdp_run \
  > "$OUT/fsdp_run.log" 2>&1; echo "fsdp rc=$?" | tee -a "$OUT/fsdp_run.log"
tail -5 "$OUT/fsdp_run.log"; cat "$OUT/fsdp_run/metrics.jsonl" 2>/dev/null | tail -4
rm -rf "$OUT/fsdp_run/checkpoints" "$OUT"/fsdp_run/*.safetensors
