#!/usr/bin/env bash
# Train on this machine: NGPU processes under torchrun (NCCL on GPUs, gloo on CPU when there is none).
#   scripts/run_train.sh                                   # debug config, one process per GPU (1 on CPU)
#   NGPU=8 CONFIG_FILE=train_configs/qwen3_0.6b.toml scripts/run_train.sh --parallelism.context_parallel_degree 4
#   NGPU=2 CONFIG_FILE=train_configs/debug_sft.toml scripts/run_train.sh --training.steps 10
# Arguments after the script are job-config overrides (--section.key value) passed to train.py.
# SIGTERM or SIGINT (to this script or its process group): the step finishes, a checkpoint is saved
# and the script exits 0; any other failure exits non-zero.
set -euo pipefail

cd "$(dirname "$0")/.."
source scripts/preemption.sh
reexec_with_stop_signals scripts/run_train.sh "$@"
if [[ -z "${NGPU:-}" ]]; then
    NGPU=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    (( NGPU > 0 )) || NGPU=1
fi
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug.toml}

# --standalone: a local rendezvous on a free port, so several jobs can share a machine.
# torchrun sets OMP_NUM_THREADS=1 per process unless it is already set. SIGTERM/SIGINT go to the
# workers, which save and exit 0 (scripts/preemption.sh).
torchrun_preemptible --standalone --nproc_per_node "$NGPU" \
    train.py --job.config_file "$CONFIG_FILE" "$@"
