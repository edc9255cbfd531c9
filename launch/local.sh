#!/usr/bin/env bash
# Run sae-jax as NPROC cooperating processes on this machine: jax.distributed with the
# coordinator on 127.0.0.1 and the CPU backend (gloo collectives). This exercises the
# multi-host code path without a cluster.
#
# Usage: launch/local.sh NPROC CONFIG [key=value ...]
#   e.g. launch/local.sh 2 configs/demo.yaml train.workdir=runs/demo_2proc
#        SAE_JAX_CMD=sweep launch/local.sh 2 configs/sweep.yaml   # a sweep needs a grid (sweep.KEY=[...])
#        SAE_JAX_CMD=harvest launch/local.sh 2 OUT --model M --corpus C --hooks H --tokens N
#
# Environment:
#   SAE_JAX_CMD    subcommand to run (default: train)
#   PYTHON         interpreter, split on spaces (default: the repository's .venv/bin/python, made by
#                  scripts/setup.sh, where it exists, else python3); it must import sae_jax and jax
#   PORT           coordinator port (default: a free port chosen by PYTHON)
#   LOG_DIR        where procI.log go (default: a new directory under $TMPDIR or /tmp)
#   JAX_PLATFORMS  passed to the children (default: cpu)
#   KILL_GRACE     seconds between SIGTERM and SIGKILL when stopping children (default: 10)
#
# If any process fails, the others are stopped and the script exits with that status.
# SIGINT/SIGTERM stop all children (they are sent SIGTERM, because background children
# of a non-interactive shell ignore SIGINT).
set -euo pipefail

usage() {
  sed -n '6,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  echo "See the header of $0 for the environment variables." >&2
  exit 2
}

die() {
  echo "local.sh: $*" >&2
  exit 2
}

[[ $# -ge 2 ]] || usage
nproc=$1
config=$2
shift 2
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$nproc'"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
default_python=python3
[[ ! -x $here/../.venv/bin/python ]] || default_python=$here/../.venv/bin/python
read -r -a python <<<"${PYTHON:-$default_python}"
[[ ${#python[@]} -gt 0 ]] || die "PYTHON is empty"
# Say so now, not as NPROC tracebacks: the interpreter must have the package and jax.
"${python[@]}" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("jax") and u.find_spec("sae_jax") else 1)' \
  2>/dev/null || die "${python[*]} cannot import sae_jax and jax; run scripts/setup.sh (it makes .venv/, which is then the default) or set PYTHON=/path/to/venv/bin/python"
subcommand=${SAE_JAX_CMD:-train}
grace=${KILL_GRACE:-10}
[[ $grace =~ ^[0-9]+$ ]] || die "KILL_GRACE must be a whole number of seconds, got '$grace'"

if [[ -n ${PORT:-} ]]; then
  port=$PORT
else
  # The port is free now; process 0 binds it a moment later (a small, accepted race).
  port=$("${python[@]}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ $port =~ ^[0-9]+$ ]] || die "could not choose a port (got '$port')"
coordinator=127.0.0.1:$port

log_dir=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sae-jax-local.XXXXXX")}
mkdir -p "$log_dir"

export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export PYTHONUNBUFFERED=1

pids=()      # pids[i]: process i
statuses=()  # statuses[i]: exit status of process i, once reaped
status=0     # the script's exit status: the first failure or signal
term_at=""   # $SECONDS when the children were sent SIGTERM
killed=0

terminate() {
  [[ -z $term_at ]] || return 0
  term_at=$SECONDS
  local i
  for i in "${!pids[@]}"; do
    [[ -n ${statuses[i]:-} ]] || kill -TERM "${pids[i]}" 2>/dev/null || true
  done
}

kill_remaining() {
  local i
  for i in "${!pids[@]}"; do
    [[ -n ${statuses[i]:-} ]] || kill -KILL "${pids[i]}" 2>/dev/null || true
  done
}

# shellcheck disable=SC2317,SC2329 # called from the traps below, which shellcheck does not see
on_signal() {
  echo "local.sh: got SIG$1, stopping all processes" >&2
  [[ $status -ne 0 ]] || status=$2
  terminate
}

trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
# If this script dies unexpectedly, take the children with it.
trap 'kill_remaining' EXIT

echo "local.sh: $nproc x ${python[*]} -m sae_jax $subcommand $config (coordinator $coordinator)" >&2
echo "local.sh: logs in $log_dir/proc{0..$((nproc - 1))}.log (e.g. tail -f $log_dir/proc0.log)" >&2

for ((i = 0; i < nproc; i++)); do
  [[ -z $term_at ]] || break # a signal arrived while starting
  "${python[@]}" -m sae_jax "$subcommand" "$config" "$@" \
    "distributed.coordinator=$coordinator" \
    "distributed.num_processes=$nproc" \
    "distributed.process_id=$i" \
    >"$log_dir/proc$i.log" 2>&1 &
  pids[i]=$!
done

# Poll rather than `wait -n`: portable to older bash and tells us which process ended.
while true; do
  running=0
  for i in "${!pids[@]}"; do
    [[ -z ${statuses[i]:-} ]] || continue
    if kill -0 "${pids[i]}" 2>/dev/null; then
      running=$((running + 1))
      continue
    fi
    rc=0
    wait "${pids[i]}" || rc=$?
    statuses[i]=$rc
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      echo "local.sh: process $i exited with status $rc; stopping the others. End of $log_dir/proc$i.log:" >&2
      tail -n 20 "$log_dir/proc$i.log" >&2 || true
      terminate
    fi
  done
  [[ $running -gt 0 ]] || break
  if [[ -n $term_at && $killed -eq 0 ]] && ((SECONDS - term_at >= grace)); then
    echo "local.sh: processes still running ${grace}s after SIGTERM; sending SIGKILL" >&2
    kill_remaining
    killed=1
  fi
  sleep 0.2
done

trap - EXIT
if [[ $status -eq 0 ]]; then
  echo "local.sh: all $nproc processes finished; logs in $log_dir" >&2
else
  echo "local.sh: failed with status $status; logs in $log_dir" >&2
fi
exit "$status"
