#!/usr/bin/env bash
# Train lm2-jax on a Cloud TPU pod slice (or several) with gcloud TPU VMs, --worker=all.
#
#   launch/tpu_pod.sh --name lm2 --zone us-east5-a --type v5p-64 --create --spot \
#       --workdir /gcs/bucket/runs/lm2 -- --config=configs/lm2_1p7b.py --config.train.steps=20000
#   launch/tpu_pod.sh status|logs|stop|delete --name lm2 --zone us-east5-a [--num_slices K]
#
# `run` (the default) creates the slice(s) if asked (a queued resource; waits until ACTIVE), copies
# this checkout to every worker, installs it into a venv there (`pip install -e ".[tpu]"`), kills
# stale trainers and the libtpu lock, and starts `python -m lm2_jax.train` on every worker under
# nohup, one log per worker. Running the same command again after a preemption resumes from the
# newest checkpoint in --workdir (a directory every host sees). --dry_run prints every
# gcloud command instead of running it. Every gcloud call goes through `g`.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh [run|status|logs|stop|delete] --name NAME --zone ZONE [options] [-- TRAIN FLAGS]

  run (default)   copy, install and start training on every worker (after --create, if given)
  status          the queued resource / TPU state and whether each worker is training
  logs            the last lines of every worker's log (--follow: follow worker 0)
  stop            SIGTERM the trainers (they checkpoint and exit 0)
  delete          delete the slice(s) (and their queued resource)

options:
  --name NAME         TPU VM name; with --num_slices K the slices are NAME-0 .. NAME-(K-1)
  --zone ZONE         e.g. us-east5-a
  --type TYPE         accelerator type (run/--create): v4-N, v5litepod-N (or v5e-N), v5p-N, v6e-N
  --project PROJECT   gcloud project (default: gcloud's configured one)
  --create            create the slice(s) as a queued resource and wait until ACTIVE
  --spot | --reserved capacity for --create (default: on demand)
  --recreate          with --create: delete and recreate a queued resource that is FAILED or SUSPENDED
  --num_slices K      multislice: K slices of --type (queued resource --node-count K)
  --version V         TPU VM runtime version (default from --type)
  --workdir DIR       training workdir every host sees: gs://bucket/runs/x (or a shared mount)
  --follow            logs: follow worker 0's log
  --dry_run           print the gcloud commands instead of running them
  -h, --help          this text

Everything after `--` goes to `python -m lm2_jax.train` (it must name a --config that exists here).
Environment: LIBTPU_INIT_ARGS (default: the overlap flags below), LM2_TPU_POLL_S (queued-resource
poll interval, default 60), LM2_REMOTE_DIR (checkout dir on the workers, default lm2-jax).
EOF
}

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

# MaxText's defaults for collective/compute overlap on TPU; LIBTPU_INIT_ARGS replaces them.
DEFAULT_LIBTPU_ARGS="--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"

cmd=run
case "${1:-}" in
  run|status|logs|stop|delete) cmd=$1; shift ;;
esac

name="" zone="" type="" project="" create=0 capacity="" recreate=0 slices=1 version="" workdir=""
follow=0 dry_run=0 train_args=() saw_dashes=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --zone) zone=${2:?--zone needs a value}; shift 2 ;;
    --type) type=${2:?--type needs a value}; shift 2 ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --create) create=1; shift ;;
    --spot) capacity=spot; shift ;;
    --reserved) capacity=reserved; shift ;;
    --recreate) recreate=1; shift ;;
    --num_slices) slices=${2:?--num_slices needs a value}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
    --follow) follow=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) saw_dashes=1; shift; train_args=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n $name ]] || die "--name is required"
[[ -n $zone ]] || die "--zone is required"
[[ $slices =~ ^[1-9][0-9]*$ ]] || die "--num_slices=$slices: must be a positive integer"

# --type -> gcloud's accelerator type and the default runtime version
accelerator="" default_version=""
if [[ $cmd == run || $create == 1 ]]; then
  [[ -n $type ]] || die "--type is required to run or create (e.g. v5p-64)"
  case "$type" in
    v4-[0-9]*) accelerator=$type default_version=tpu-ubuntu2204-base ;;
    v5e-[0-9]*) accelerator=v5litepod-${type#v5e-} default_version=v2-alpha-tpuv5-lite ;;
    v5litepod-[0-9]*) accelerator=$type default_version=v2-alpha-tpuv5-lite ;;
    v5p-[0-9]*) accelerator=$type default_version=v2-alpha-tpuv5 ;;
    v6e-[0-9]*) accelerator=$type default_version=v2-alpha-tpuv6e ;;
    *) die "--type=$type: unknown accelerator type (v4-N, v5litepod-N or v5e-N, v5p-N, v6e-N)" ;;
  esac
  [[ ${accelerator##*-} =~ ^[1-9][0-9]*$ ]] || die "--type=$type: the chip count after '-' must be a number"
  version=${version:-$default_version}
fi
[[ $recreate == 0 || $create == 1 ]] || die "--recreate needs --create"
[[ -z $capacity || $create == 1 ]] || die "--$capacity needs --create"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/train_args.sh
source "$here/launch/train_args.sh"
if [[ $cmd == run ]]; then
  check_train_args "$saw_dashes" "$here" "${train_args[@]}"
  [[ -n $workdir ]] || die "--workdir is required: a directory every host sees (gs://bucket/runs/x, or a shared mount)"
fi

nodes=()
if [[ $slices == 1 ]]; then nodes=("$name"); else
  for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done
fi
remote=${LM2_REMOTE_DIR:-lm2-jax}
logdir="$remote-logs"
common=(--zone="$zone")
[[ -n $project ]] && common+=(--project="$project")

# One gcloud call: printed (and not run) with --dry_run, else run; a failure names the step.
g() {
  if [[ $dry_run == 1 ]]; then
    printf 'gcloud'; printf ' %q' "$@"; printf '\n'
    return 0
  fi
  local rc=0
  gcloud "$@" || rc=$?
  if [[ $rc != 0 ]]; then
    if [[ $rc == 255 ]]; then
      die "gcloud ${*:1:5} failed with ssh's exit 255: a worker is unreachable (not ACTIVE yet, firewall or ssh keys); see its message above"
    fi
    die "gcloud $* failed (exit $rc)"
  fi
}

# The output of a gcloud query. A dry run prints the query on fd 3 (the script's stdout, which
# $(...) does not capture, so the printed sequence stays in order) and answers with $1, the value
# a live call would give.
exec 3>&1
q() {
  local canned=$1; shift
  if [[ $dry_run == 1 ]]; then
    { printf 'gcloud'; printf ' %q' "$@"; printf '\n'; } >&3
    echo "$canned"
    return 0
  fi
  gcloud "$@"
}

ssh_all() {  # ssh_all NODE COMMAND
  g compute tpus tpu-vm ssh "$1" "${common[@]}" --worker=all --command="$2"
}

create_slices() {
  local args=(compute tpus queued-resources create "$name" "${common[@]}" --accelerator-type="$accelerator"
              --runtime-version="$version")
  if [[ $slices == 1 ]]; then args+=(--node-id="$name"); else args+=(--node-count="$slices" --node-prefix="$name"); fi
  [[ -n $capacity ]] && args+=("--$capacity")
  local state
  state=$(q NOT_FOUND compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)' 2>/dev/null || echo NOT_FOUND)
  if [[ $state == NOT_FOUND || -z $state ]]; then
    g "${args[@]}"
  fi
  local poll=${LM2_TPU_POLL_S:-60}
  while true; do
    state=$(q ACTIVE compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)')
    case "$state" in
      ACTIVE) echo "queued resource $name is ACTIVE"; return 0 ;;
      FAILED|SUSPENDED)
        [[ $recreate == 1 ]] || die "queued resource $name is $state; rerun with --recreate to delete and recreate it"
        echo "queued resource $name is $state: deleting and recreating it"
        g compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
        g "${args[@]}" ;;
      *) echo "queued resource $name is $state; waiting ${poll}s" ;;
    esac
    sleep "$poll"
  done
}

# Kill whatever holds the TPU (a stale trainer) and remove libtpu's lock: "TPU already in use" otherwise.
# The [l] keeps pkill/pgrep -f from matching the remote shell whose command line carries the pattern.
KILL_STALE="sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9; pkill -9 -f '[l]m2_jax[.]train' || true; sudo rm -f /tmp/libtpu_lockfile"

run() {
  [[ $create == 1 ]] && create_slices
  local commit tarball
  commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
  tarball="${TMPDIR:-/tmp}/lm2-jax-$name.tar.gz"
  if [[ $dry_run == 1 ]]; then
    echo "tar czf $tarball (the checkout's tracked and untracked-but-not-ignored files, commit $commit)"
  else
    (cd "$here" && git ls-files -z --cached --others --exclude-standard | tar czf "$tarball" --null -T -)
  fi
  local coordinator=""
  if [[ $slices -gt 1 ]]; then
    coordinator=$(q 10.0.0.2 compute tpus tpu-vm describe "${nodes[0]}" "${common[@]}" --format='value(networkEndpoints[0].ipAddress)')
  fi
  local flags
  flags=$(quoted_flags "${train_args[@]}")
  local libtpu=${LIBTPU_INIT_ARGS:-$DEFAULT_LIBTPU_ARGS}
  local i=0 node
  # Every slice is ready before any starts: JAX's start-up waits for all hosts only so long.
  for node in "${nodes[@]}"; do
    g compute tpus tpu-vm scp "$tarball" "$node:lm2-jax.tar.gz" "${common[@]}" --worker=all
    ssh_all "$node" "set -e; mkdir -p $remote $logdir; tar xzf lm2-jax.tar.gz -C $remote; cd $remote; test -x .venv/bin/python || python3 -m venv .venv; .venv/bin/pip install -q -e '.[tpu]'; echo $commit > .launched-commit"
  done
  for node in "${nodes[@]}"; do
    local env="export LIBTPU_INIT_ARGS='$libtpu';"
    if [[ $slices -gt 1 ]]; then
      env+=" export MEGASCALE_COORDINATOR_ADDRESS=$coordinator:8081 MEGASCALE_NUM_SLICES=$slices MEGASCALE_SLICE_ID=$i MEGASCALE_PORT=8081;"
    fi
    ssh_all "$node" "$KILL_STALE; cd $remote; $env nohup .venv/bin/python -m lm2_jax.train --workdir=$workdir$flags > ~/$logdir/\$(hostname).log 2>&1 < /dev/null & echo started on \$(hostname)"
    i=$((i + 1))
  done
  echo "training started on ${nodes[*]} (commit $commit); workdir $workdir"
  local more=""
  [[ $slices -gt 1 ]] && more=" --num_slices $slices"
  echo "follow:  launch/tpu_pod.sh logs --name $name --zone $zone$more --follow"
  echo "stop:    launch/tpu_pod.sh stop --name $name --zone $zone$more"
  echo "resume after a preemption: run this same command again"
}

status() {
  # the queued resource, if the slice was made by --create (a slice made otherwise has none)
  q ACTIVE compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)' 2>/dev/null || true
  local node
  for node in "${nodes[@]}"; do
    g compute tpus tpu-vm describe "$node" "${common[@]}" --format='value(state,acceleratorType)'
    ssh_all "$node" "echo \$(hostname): \$(pgrep -f '[l]m2_jax[.]train' >/dev/null && echo training || echo 'not training'); tail -n 1 ~/$logdir/\$(hostname).log 2>/dev/null || true"
  done
}

logs() {
  local node
  if [[ $follow == 1 ]]; then
    g compute tpus tpu-vm ssh "${nodes[0]}" "${common[@]}" --worker=0 --command="tail -n 50 -F ~/$logdir/*.log"
    return
  fi
  for node in "${nodes[@]}"; do
    ssh_all "$node" "echo == \$(hostname); tail -n 20 ~/$logdir/\$(hostname).log"
  done
}

stop() {
  local node
  for node in "${nodes[@]}"; do
    ssh_all "$node" "pkill -TERM -f '[l]m2_jax[.]train' && echo \$(hostname): SIGTERM sent || echo \$(hostname): not training"
  done
}

delete() {
  local state
  state=$(q ACTIVE compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)' 2>/dev/null || echo NOT_FOUND)
  if [[ $state != NOT_FOUND && -n $state ]]; then
    g compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    local node
    for node in "${nodes[@]}"; do g compute tpus tpu-vm delete "$node" "${common[@]}" --quiet; done
  fi
}

"$cmd"
