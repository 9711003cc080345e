#!/usr/bin/env bash
# Train on several machines: run this once on every node (by hand, pdsh, or srun; see
# scripts/slurm_train.sbatch). torchrun's c10d rendezvous at RDZV_ENDPOINT gathers the nodes, so
# no node needs to know its rank and any node may host the endpoint.
#   NNODES=2 NGPU=8 RDZV_ENDPOINT=node0:29400 RDZV_ID=job42 CONFIG_FILE=train_configs/qwen3_1.7b.toml \
#       scripts/multinode_train.sh --parallelism.context_parallel_degree 8
# Arguments after the script are job-config overrides (--section.key value) passed to train.py.
set -euo pipefail

cd "$(dirname "$0")/.."
source scripts/preemption.sh  # SIGTERM/SIGINT go to the workers, which save and exit 0
reexec_with_stop_signals scripts/multinode_train.sh "$@"
: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port, reachable from every node}"
NGPU=${NGPU:-8}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-train}}  # the same on every node of one job, different between jobs
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug.toml}

torchrun_preemptible \
    --nnodes "$NNODES" --nproc_per_node "$NGPU" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" \
    train.py --job.config_file "$CONFIG_FILE" "$@"
