#!/usr/bin/env bash
# Parameter server over MPI (mpi4py): rank 0 is the server, every other rank a worker.
# Extra arguments go to `python -m commlib.ps`; MPIRUN_ARGS go to mpirun (hosts, bindings).
#
#   bash launch/ps_mpirun.sh 5 --mode async --steps 500 --max-staleness 8
#   MPIRUN_ARGS="-hosts node1,node2" bash launch/ps_mpirun.sh 16 --quorum 12
# Every frame is authenticated with the job secret: made here when COMMLIB_SECRET(_FILE) is
# unset; MPICH's mpirun passes the environment to every rank (Open MPI: add -x COMMLIB_SECRET).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/_python.sh
source launch/_python.sh
commlib_job_secret
NP=${1:-3}
[ $# -gt 0 ] && shift
VENV=${COMMLIB_VENV:-.venv}
# shellcheck disable=SC2086
exec "$VENV/bin/mpirun" ${MPIRUN_ARGS:-} -n "$NP" "$VENV/bin/python" -m commlib.ps --transport mpi "$@"
