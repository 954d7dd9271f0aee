#!/usr/bin/env bash
# Sets up .venv (once) and runs one experiment on this machine.
#
#   launch/local.sh experiments/decoupled_diloco.py:chaos workdirs/dd [--config.x=y ...]
#
# On a GPU host set EXTRAS=cuda, on a Cloud TPU VM EXTRAS=tpu, to install the
# matching jax build. Re-running with the same workdir resumes the run.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:variant] WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
config=$1 workdir=$2
shift 2
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
fi
exec .venv/bin/python -m decoupled_diloco.main --config="$config" --workdir="$workdir" "$@"
