#!/usr/bin/env bash
# sae-jax on a Cloud TPU VM slice: the same command on every worker over
# `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the other workers itself.
#
# Usage: launch/tpu_vm.sh TPU_NAME CONFIG [key=value ...]
#   e.g. ZONE=us-central2-b SYNC=1 INSTALL=1 launch/tpu_vm.sh my-v4-32 configs/demo.yaml
#        ZONE=us-central2-b DETACH=1 launch/tpu_vm.sh my-v4-32 configs/demo.yaml optim.lr=3e-4
#        ZONE=z DRY_RUN=1 launch/tpu_vm.sh my-v4-32 configs/demo.yaml   # print the gcloud commands
#
# Environment:
#   ZONE          TPU zone (required)
#   PROJECT       GCP project (default: gcloud's configured project)
#   SAE_JAX_CMD   subcommand (default: train)
#   PYTHON        interpreter on the workers (default: python3), e.g. '~/venv/bin/python'
#   REMOTE_DIR    checkout on the workers, relative to the remote home (default: sae_jax)
#                 PYTHON and REMOTE_DIR are pasted into the remote shell unquoted, so
#                 ~ and $HOME work there; CONFIG and the overrides are quoted.
#   SYNC=1        first copy this checkout (tracked and untracked-but-not-ignored files)
#                 to REMOTE_DIR on every worker
#   INSTALL=1     first run `PYTHON -m pip install INSTALL_SPEC` in REMOTE_DIR on every
#                 worker (INSTALL_SPEC default: '.[tpu]')
#   REMOTE_ENV    "KEY=VALUE ..." set for the run on the workers
#   DETACH=1      start the run under nohup and return; output in REMOTE_DIR/REMOTE_LOG
#                 (REMOTE_LOG default: sae_jax.log)
#   GCLOUD_FLAGS  extra flags for every gcloud call, split on spaces
#                 (e.g. "--tunnel-through-iap --internal-ip")
#   DRY_RUN=1     print the gcloud commands instead of running them
set -euo pipefail

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

[[ $# -ge 2 ]] || die "usage: $0 TPU_NAME CONFIG [key=value ...]"
name=$1
config=$2
shift 2
[[ -n ${ZONE:-} ]] || die "set ZONE to the TPU's zone"

dry_run=${DRY_RUN:-0}
python=${PYTHON:-python3}
remote_dir=${REMOTE_DIR:-sae_jax}
subcommand=${SAE_JAX_CMD:-train}

read -r -a gcloud_flags <<<"${GCLOUD_FLAGS:-}"
gcloud_common=(--zone="$ZONE")
[[ -z ${PROJECT:-} ]] || gcloud_common+=(--project="$PROJECT")
gcloud_common+=("${gcloud_flags[@]}")

# shell_quote ARGS...: print ARGS as one line a shell reads back the same (like shlex.quote).
shell_quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if [[ $dry_run == 1 ]]; then
    shell_quote "$@"
  else
    "$@"
  fi
}

on_all_workers() { # on_all_workers REMOTE_SHELL_COMMAND
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_common[@]}" --worker=all --command="$1"
}

# --- optional: copy this checkout to the workers --------------------------------
if [[ ${SYNC:-0} == 1 ]]; then
  repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  tarball_name=sae_jax_src.tar.gz
  if [[ $dry_run == 1 ]]; then
    echo "# git ls-files -co --exclude-standard | tar -czf /tmp/$tarball_name (from $repo_root)"
    tarball=/tmp/$tarball_name
  else
    tarball=$(mktemp "${TMPDIR:-/tmp}/sae_jax_src.XXXXXX.tar.gz")
    trap 'rm -f "$tarball"' EXIT
    git -C "$repo_root" ls-files -z -co --exclude-standard |
      tar -C "$repo_root" --null --ignore-failed-read -T - -czf "$tarball"
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:$tarball_name" "${gcloud_common[@]}" --worker=all
  on_all_workers "mkdir -p $remote_dir && tar -xzf $tarball_name -C $remote_dir && rm -f $tarball_name"
fi

# --- optional: install the package on the workers ----------------------------------
if [[ ${INSTALL:-0} == 1 ]]; then
  on_all_workers "cd $remote_dir && $python -m pip install --upgrade $(shell_quote "${INSTALL_SPEC:-.[tpu]}")"
fi

# --- the run --------------------------------------------------------------------
job="$python -m sae_jax $(shell_quote "$subcommand" "$config" "$@")"
[[ -z ${REMOTE_ENV:-} ]] || job="env $REMOTE_ENV $job"
if [[ ${DETACH:-0} == 1 ]]; then
  log=${REMOTE_LOG:-sae_jax.log}
  on_all_workers "cd $remote_dir && nohup bash -c $(shell_quote "$job") >$(shell_quote "$log") 2>&1 </dev/null & echo \"started on \$(hostname); log: $remote_dir/$log\""
else
  on_all_workers "cd $remote_dir && $job"
fi
