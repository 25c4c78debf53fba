#!/usr/bin/env bash
# Train lm2-jax on a Slurm GPU cluster: one process per GPU, started by srun inside an sbatch job.
#
#   launch/gpu_slurm.sh --nodes 4 --gpus_per_node 8 --partition gpu --time 24:00:00 \
#       --workdir /shared/runs/lm2 -- --config=configs/lm2_1p7b.py
#
# Writes the job script to <job_dir>/<name>.sbatch and submits it. Inside the job each srun task
# is one JAX process with one GPU; `python -m lm2_jax.train` finds the coordinator, process count
# and id in the Slurm environment (lm2_jax.parallel.initialize_distributed), `--kill-on-bad-exit=1`
# ends every rank when one fails, and each rank logs to <job_dir>/<name>-<jobid>-rank<k>.log.
# Submitting the same command again resumes from the newest checkpoint in --workdir (a shared
# filesystem every node sees). --dry_run prints the script and the sbatch command instead.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_slurm.sh --nodes N --gpus_per_node G --workdir DIR [options] -- TRAIN FLAGS

  --nodes N           nodes to allocate
  --gpus_per_node G   GPUs (= processes) per node
  --workdir DIR       training workdir on a filesystem every node sees
  --name NAME         job name (default lm2)
  --partition P       Slurm partition
  --account A         Slurm account
  --time T            time limit (default 24:00:00)
  --job_dir DIR       where the job script and the per-rank logs go (default runs/slurm)
  --venv DIR          a virtualenv to activate on every node (default: the current python)
  --dry_run           print the job script and the sbatch command, submit nothing
  -h, --help          this text

Everything after `--` goes to `python -m lm2_jax.train` (it must name a --config that exists).
EOF
}

die() { echo "gpu_slurm.sh: error: $*" >&2; exit 2; }

nodes="" gpus="" workdir="" name=lm2 partition="" account="" time_limit=24:00:00 job_dir=runs/slurm venv=""
dry_run=0 saw_dashes=0 train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nodes) nodes=${2:?--nodes needs a value}; shift 2 ;;
    --gpus_per_node) gpus=${2:?--gpus_per_node needs a value}; shift 2 ;;
    --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --partition) partition=${2:?--partition needs a value}; shift 2 ;;
    --account) account=${2:?--account needs a value}; shift 2 ;;
    --time) time_limit=${2:?--time needs a value}; shift 2 ;;
    --job_dir) job_dir=${2:?--job_dir needs a value}; shift 2 ;;
    --venv) venv=${2:?--venv needs a value}; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    --) saw_dashes=1; shift; train_args=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes is required: a positive integer (got '${nodes}')"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node is required: a positive integer (got '${gpus}')"
[[ -n $workdir ]] || die "--workdir is required (on a filesystem every node sees)"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/train_args.sh
source "$here/launch/train_args.sh"
check_train_args "$saw_dashes" "$here" "${train_args[@]}"
flags=$(quoted_flags "${train_args[@]}")
activate=""
[[ -n $venv ]] && activate="source $(printf '%q' "$venv")/bin/activate"
python=${venv:+python}
python=${python:-$(command -v python3 || echo python3)}

script=$(cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=$name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --output=$job_dir/$name-%j.out
${partition:+#SBATCH --partition=$partition}
${account:+#SBATCH --account=$account}
set -euo pipefail
cd $(printf '%q' "$here")
$activate
# One JAX process per GPU: srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, from which
# jax.distributed.initialize finds the coordinator, the process count and this process's GPU.
srun --kill-on-bad-exit=1 --gpus-per-task=1 bash -c '$python -m lm2_jax.train --workdir=$workdir$flags > $job_dir/$name-\${SLURM_JOB_ID}-rank\${SLURM_PROCID}.log 2>&1'
EOF
)

path="$job_dir/$name.sbatch"
if [[ $dry_run == 1 ]]; then
  echo "# $path"
  echo "$script"
  echo "sbatch $path"
  exit 0
fi
mkdir -p "$job_dir"
printf '%s\n' "$script" > "$path"
sbatch "$path" || die "sbatch $path failed"
echo "submitted $path; logs: $job_dir/$name-<jobid>-rank<k>.log; cancel with scancel --name=$name"
