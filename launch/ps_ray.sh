#!/usr/bin/env bash
# Parameter server on Ray: this process is the server, each worker a Ray actor.
# Without RAY_ADDRESS a local Ray is started (Ray token authentication with a fresh token, no
# dashboard, every Ray process killed when this one ends; files under .tmp/ray); frames are
# authenticated with COMMLIB_SECRET (made by the driver when unset, passed to the actors);
# with RAY_ADDRESS (e.g. "auto" on a node of a cluster started by `ray start`) it joins that cluster.
#
#   bash launch/ps_ray.sh 8 --steps 300 --quorum 6 --step-timeout 2
#   ray start --head --port 6379 && RAY_ADDRESS=auto bash launch/ps_ray.sh 32
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=${1:-4}
[ $# -gt 0 ] && shift
VENV=${COMMLIB_VENV:-.venv}
export COMMLIB_TMP=${COMMLIB_TMP:-$PWD/.tmp}
ADDR=()
[ -n "${RAY_ADDRESS:-}" ] && ADDR=(--address "$RAY_ADDRESS")
exec "$VENV/bin/python" -m commlib.ps --transport ray --workers "$WORKERS" "${ADDR[@]}" "$@"
