#!/usr/bin/env bash
# Container entrypoint: `sae-jax "$@"` (no arguments: --help).
#
# sae-jax runs as a child rather than via exec: a process that is PID 1 in a container
# does not die of SIGTERM unless it installs a handler, so `docker stop` and Kubernetes
# would wait out their grace period. This shell forwards SIGTERM and SIGINT (as SIGTERM)
# and exits with sae-jax's status.
set -euo pipefail

[[ $# -gt 0 ]] || set -- --help

sae-jax "$@" &
child=$!
# shellcheck disable=SC2317,SC2329 # called from the traps below
forward() { kill -TERM "$child" 2>/dev/null || true; }
trap forward TERM INT

# `wait` returns early (status > 128) when a trapped signal arrives; wait until the child
# has really gone, then once more to collect its own exit status.
while kill -0 "$child" 2>/dev/null; do
  wait "$child" || true
done
rc=0
wait "$child" || rc=$?
exit "$rc"
