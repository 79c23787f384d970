#!/usr/bin/env bash
# The GPU checks behind docs/benchmarks.md, in one go on one CUDA GPU (each step under its own time limit):
#   1. the synthetic chain (run_chain.sh) in bf16 mixed precision: every stage, attack and report on the GPU;
#   2. purifier throughput (DDPM vs DDIM) on the chain's teacher and purifier;
#   3. PGD-10 adversarial-training overhead of the default teacher, bf16;
#   4. one epoch of the real-size teacher (configs/teacher_vit_b16.yaml: ViT-B/16 at 224 px, bf16) with its test attacks;
#   5. the lung segmenter (configs/segment.yaml), bf16.
#   bash benchmarks/gpu_check.sh OUT_DIR
#   CHECKS="chain segment" STAGES="teacher purifier" bash benchmarks/gpu_check.sh OUT_DIR   # some checks, some chain stages
# Loggers are off (--trainer.logger false) so that the check needs no W&B install.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
gpu=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --trainer.logger false)
checks=" ${CHECKS:-chain purify_throughput attack_overhead teacher_vit_b16 segment} "
step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, output to OUT_DIR/NAME.log, if CHECKS names it
  local name=$1 limit=$2; shift 2
  [[ $checks == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, lightning, timm, diffusers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, 'diffusers', diffusers.__version__)"
} > "$out/env.txt" 2>&1
step chain 270 bash run_chain.sh "${gpu[@]}"
step purify_throughput 60 python benchmarks/purify_throughput.py --device cuda --output "$out/purify_throughput_gpu.json"
step attack_overhead 45 python benchmarks/attack_overhead.py --accelerator gpu --precision bf16-mixed --output "$out/attack_overhead_gpu.json"
step teacher_vit_b16 120 python train.py --config configs/teacher_vit_b16.yaml "${gpu[@]}" --trainer.max_epochs 1 \
  --data.synthetic_samples 2000 --run_dir runs/teacher_vit_b16_check
step segment 120 python train.py --config configs/segment.yaml "${gpu[@]}"
tar czf "$out/reports.tgz" runs/*/robustness_report.md runs/*/model_costs.md 2>/dev/null
