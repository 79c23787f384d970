#!/bin/bash
# The body of the train_*.sbatch templates: one srun task per GPU, each running train.py with DDP settings taken
# from the allocation. Arguments are passed on to train.py as overrides.
#
# Variables (set them in the environment of `sbatch`, which exports it to the job):
#   CONFIG      the stage's config (default configs/teacher.yaml)
#   RUN_DIR     the run directory (default runs/<config name>-<job id>), on a file system every node sees. A
#               requeued job keeps its job id, so it resumes there (--resume auto) from the newest of
#               checkpoints/last.ckpt and the requeue checkpoint hpc_ckpt_<n>.ckpt, and logs to the same W&B run
#               (its id is stored in RUN_DIR/wandb_run_id)
#   WANDB_MODE  offline (default) or online (after `wandb login`); only global rank 0 logs
# GPUs per node = --ntasks-per-node, and nodes = --nodes: Lightning checks both against --trainer.devices and
# --trainer.num_nodes, which come from SLURM_NTASKS_PER_NODE and SLURM_NNODES here.
set -euo pipefail
CONFIG=${CONFIG:-configs/teacher.yaml}
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-$SLURM_JOB_ID}
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $CONFIG -> $RUN_DIR"

exec srun python train.py --config "$CONFIG" --run_dir "$RUN_DIR" --resume auto \
    --trainer.accelerator gpu --trainer.strategy ddp \
    --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.num_nodes "$SLURM_NNODES" "$@"
