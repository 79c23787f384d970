#!/usr/bin/env bash
# The whole chain on the embedded synthetic data, each stage through train.py and its config:
#   teacher -> purifier -> purify-then-fine-tune -> student (robustly distilled from the teacher: ARD).
# Each stage finds the previous one's checkpoint or export through its config's defaults, and a
# re-run resumes each stage from runs/<stage>/checkpoints/last.ckpt (a finished stage only re-runs its test).
#   bash run_chain.sh                       # everything
#   STAGES="teacher distill" bash run_chain.sh
# Extra arguments go to every stage, e.g. `bash run_chain.sh --trainer.accelerator cpu`.
set -euo pipefail
cd "$(dirname "$0")"
STAGES=${STAGES:-"teacher purifier purify_finetune distill"}
read -r -a stages <<< "$STAGES"
start=$SECONDS
for i in "${!stages[@]}"; do
  stage=${stages[$i]}
  echo "=== [$((i + 1))/${#stages[@]}] $stage: python train.py --config configs/$stage.yaml $* (elapsed $((SECONDS - start)) s)"
  python train.py --config "configs/$stage.yaml" "$@"
done
echo "=== chain finished in $((SECONDS - start)) s"
for report in runs/purify_finetune/robustness_report.md runs/student/robustness_report.md runs/student/model_costs.md; do
  if [[ -f $report ]]; then
    echo "--- $report"
    cat "$report"
  fi
done
