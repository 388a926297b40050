#!/usr/bin/env bash
# Parameter server over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).
# Rank 0 is the server, every other process a worker. Extra arguments go to `python -m commlib.ps`.
#
#   bash launch/ps_torchrun.sh 4 --steps 200 --scheme '{"compressor": "topk", "ratio": 0.01, "feedback": "ef21"}'
#   # several nodes: run on every node with the same MASTER_ADDR, its own NODE_RANK
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 COMMLIB_SECRET_FILE=/shared/job.secret \
#     bash launch/ps_torchrun.sh 8 --quorum 12 --step-timeout 5
# Every frame is authenticated with the job secret: one node makes a fresh one; several nodes
# need the same COMMLIB_SECRET_FILE / COMMLIB_SECRET on each. torchrun's rendezvous port
# (MASTER_PORT, 29500) and gloo's ports must be firewalled to the job's nodes (README "Security model").
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/_python.sh
source launch/_python.sh
commlib_job_secret
NPROC=${1:-3}
[ $# -gt 0 ] && shift
VENV=${COMMLIB_VENV:-.venv}
if [ "${NNODES:-1}" -gt 1 ]; then
  exec "$VENV/bin/torchrun" --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" \
    --nproc_per_node "$NPROC" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
    -m commlib.ps --transport torch "$@"
fi
exec "$VENV/bin/torchrun" --standalone --nproc_per_node "$NPROC" -m commlib.ps --transport torch "$@"
