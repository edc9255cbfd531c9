#!/usr/bin/env bash
# One job per sweep group: a SLURM job array (one array task per group) or the groups
# run one after another on this machine. Each job gets the override GROUP_KEY=<group>.
#
# Usage: launch/sweep_grid.sh slurm|local CONFIG GROUPS [key=value ...]
#   GROUPS uses SLURM's --array syntax: 0-7 | 0,3,5 | 0-15:2 | 0-15%4 (%N = at most N
#   array tasks at once; ignored locally). Each must be below the sweep's group count, which
#   `sae-jax sweep CONFIG [key=value ...] --list-groups` prints (configs/sweep.yaml: 2 groups,
#   relu and gated); the script checks this before it starts or submits anything.
#   e.g. launch/sweep_grid.sh slurm configs/sweep.yaml 0-1 optim.lr=3e-4
#        NPROC=2 launch/sweep_grid.sh local configs/sweep.yaml 0-1
#
# Environment:
#   SAE_JAX_CMD   subcommand (default: sweep)
#   GROUP_KEY     override that selects the group (default: sweep.group)
#   PYTHON        interpreter, split on spaces (default: the repository's .venv/bin/python where it
#                 exists, else python3); it also counts the groups, on the submitting machine
#   NPROC         local: processes per group; above 1 each group runs via launch/local.sh
#   SBATCH_FLAGS  slurm: extra sbatch flags, split on spaces (e.g. "--nodes=2 -p gpu");
#                 the job itself is launch/slurm.sbatch (see its header for VENV, etc.)
#   DRY_RUN=1     print the commands instead of running them
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
  echo "sweep_grid.sh: $*" >&2
  exit 2
}

[[ $# -ge 3 ]] || die "usage: $0 slurm|local CONFIG GROUPS [key=value ...]"
mode=$1
config=$2
spec=$3
shift 3

subcommand=${SAE_JAX_CMD:-sweep}
key=${GROUP_KEY:-sweep.group}
dry_run=${DRY_RUN:-0}

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

# expand_groups SPEC: print the group ids of a SLURM --array spec, one per line.
expand_groups() {
  local item lo hi step g
  local -a items
  IFS=, read -r -a items <<<"${1%\%*}"
  [[ ${#items[@]} -gt 0 ]] || die "empty GROUPS"
  for item in "${items[@]}"; do
    if [[ $item =~ ^([0-9]+)-([0-9]+)(:([0-9]+))?$ ]]; then
      lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]} step=${BASH_REMATCH[4]:-1}
      ((10#$step > 0)) || die "bad step in '$item'"
      for ((g = 10#$lo; g <= 10#$hi; g += 10#$step)); do echo "$g"; done
    elif [[ $item =~ ^[0-9]+$ ]]; then
      echo "$((10#$item))"
    else
      die "bad GROUPS item '$item' (want N, A-B, A-B:S, separated by commas)"
    fi
  done
}

default_python=python3
[[ ! -x $here/../.venv/bin/python ]] || default_python=$here/../.venv/bin/python
read -r -a python <<<"${PYTHON:-$default_python}"
[[ ${#python[@]} -gt 0 ]] || die "PYTHON is empty"

# check_groups SPEC CONFIG OVERRIDES...: every group SPEC selects exists (a sweep's own groups only:
# with another SAE_JAX_CMD or GROUP_KEY the script cannot know what the indices mean).
check_groups() {
  local spec=$1 n g out
  shift
  [[ $subcommand == sweep && $key == sweep.group ]] || return 0
  out=$("${python[@]}" -m sae_jax sweep "$@" --list-groups) || die "could not list the groups of '$*' (above)"
  n=$(grep -c $'^[0-9]\+\t' <<<"$out" || true)
  [[ $n -gt 0 ]] || die "'sae-jax sweep $* --list-groups' printed no groups"
  while read -r g; do
    ((g < n)) || die "GROUPS '$spec' selects group $g, but this sweep has $n group(s): use indices 0-$((n - 1))"
  done < <(expand_groups "$spec")
}

case $mode in
  slurm)
    expand_groups "$spec" >/dev/null # validate before submitting
    check_groups "$spec" "$config" "$@"
    read -r -a sbatch_flags <<<"${SBATCH_FLAGS:-}"
    run sbatch --array="$spec" --job-name="sae-jax-sweep" \
      --export="ALL,ARRAY_KEY=$key,SAE_JAX_CMD=$subcommand" \
      "${sbatch_flags[@]}" "$here/slurm.sbatch" "$config" "$@"
    ;;
  local)
    expand_groups "$spec" >/dev/null # validate here: a failure inside <(...) is lost
    mapfile -t groups < <(expand_groups "$spec")
    [[ ${#groups[@]} -gt 0 ]] || die "GROUPS '$spec' selects no group"
    check_groups "$spec" "$config" "$@"
    nproc=${NPROC:-1}
    [[ $nproc =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$nproc'"
    for g in "${groups[@]}"; do
      echo "sweep_grid.sh: group $g of [${groups[*]}]" >&2
      rc=0
      if [[ $nproc -gt 1 ]]; then
        run env SAE_JAX_CMD="$subcommand" "$here/local.sh" "$nproc" "$config" "$@" "$key=$g" || rc=$?
      else
        run "${python[@]}" -m sae_jax "$subcommand" "$config" "$@" "$key=$g" || rc=$?
      fi
      [[ $rc -eq 0 ]] || {
        echo "sweep_grid.sh: group $g failed with status $rc; not starting the rest" >&2
        exit "$rc"
      }
    done
    ;;
  *) die "mode must be slurm or local, got '$mode'" ;;
esac
