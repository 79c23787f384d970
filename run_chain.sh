#!/usr/bin/env bash
# The whole chain on the embedded synthetic data, each stage through train.py and its config:
#   teacher -> purifier -> purify-then-fine-tune -> student (robustly distilled from the teacher: ARD).
# Each stage finds the previous one's checkpoint or export through its config's defaults, and a
# re-run resumes each stage from runs/<stage>/checkpoints/last.ckpt (a finished stage only re-runs its test).
# Every stage's report gets per-image worst-case rows (--adversarial.worst_case true). At the end summarize.py reads the
# reports and the student's cost table into runs/SUMMARY.md and runs/SUMMARY.json: one row per deployable model and the
# one its rule recommends; it needs all four stages' runs (from this call or an earlier one) and names a missing one.
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
  echo "=== [$((i + 1))/${#stages[@]}] $stage: python train.py --config configs/$stage.yaml --adversarial.worst_case true $* (elapsed $((SECONDS - start)) s)"
  python train.py --config "configs/$stage.yaml" --adversarial.worst_case true "$@"
done
echo "=== chain finished in $((SECONDS - start)) s"
for report in runs/purify_finetune/robustness_report.md runs/student/robustness_report.md runs/student/model_costs.md; do
  if [[ -f $report ]]; then
    echo "--- $report"
    cat "$report"
  fi
done
echo "=== summary: python summarize.py runs"
python summarize.py runs
