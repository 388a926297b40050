# shellcheck shell=bash disable=SC2034  # PY and LAUNCH_DIR are used by the scripts that source this
# Sourced by the launch scripts: picks the Python that has commlib installed.
# $PYTHON wins; else the repository's .venv (scripts/setup.sh); else python3 on PATH (a container).
_launch_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAUNCH_DIR=$_launch_dir
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$_launch_dir/../.venv/bin/python" ]; then
  PY=$_launch_dir/../.venv/bin/python
else
  PY=python3
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The parameter server's job secret (COMMLIB_SECRET or COMMLIB_SECRET_FILE; README "Security
# model"): every process of a job must have the same one. On one machine a fresh one is made
# here; a job spanning several nodes must be given one (a file on a shared file system with
# mode 600, or the variable exported on every node), since nodes cannot make the same one.
commlib_job_secret() {
  if [ -n "${COMMLIB_SECRET:-}" ] || [ -n "${COMMLIB_SECRET_FILE:-}" ] || [ "${COMMLIB_AUTH:-}" = none ]; then
    return 0
  fi
  if [ "${NNODES:-1}" != 1 ]; then
    echo "commlib: a job on several nodes needs a shared secret: set COMMLIB_SECRET_FILE (or COMMLIB_SECRET) on every node" >&2
    return 1
  fi
  COMMLIB_SECRET=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
  export COMMLIB_SECRET
}
