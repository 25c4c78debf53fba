# shellcheck shell=bash
# Sourced by launch/tpu_pod.sh and launch/gpu_slurm.sh (which define `die`): the checks and the
# quoting of the training flags given after `--`, the same for both launchers.

# check_train_args SAW_DASHES ROOT [FLAGS...]: the flags name a --config that exists (under ROOT or
# as given) and leave --workdir to the launcher.
check_train_args() {
  local saw_dashes=$1 root=$2 config="" a
  shift 2
  [[ $saw_dashes == 1 ]] || die "give the training flags after '--', e.g. -- --config=configs/lm2_1p7b.py"
  [[ $# -gt 0 ]] || die "nothing after '--': give at least --config=configs/<name>.py"
  for a in "$@"; do
    case "$a" in
      --config=*) config=${a#--config=} ;;
      --workdir=*) die "pass the workdir as the launcher's --workdir, not after '--'" ;;
    esac
  done
  [[ -n $config ]] || die "the training flags after '--' need --config=configs/<name>.py"
  [[ -f $root/${config%%:*} || -f ${config%%:*} ]] || die "--config=$config: no such config file"
}

# quoted_flags [FLAGS...]: " flag1 flag2 ...", each quoted for a remote or nested shell.
quoted_flags() {
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s' "$out"
}
