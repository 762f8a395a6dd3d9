#!/usr/bin/env bash
# Submits launch/slurm.sbatch: jaxft on NODES nodes of a SLURM GPU cluster, one process per GPU
# (default) or per node, every process running `python -m jaxft.train TRAIN_ARGS`.
#
#   launch/slurm.sh --nodes N [--gpus-per-node 8] [--per gpu|node] [--partition P] [--account A]
#                   [--time T] [--job-name jaxft] [--dry-run] -- TRAIN_ARGS...
#
# Logs: logs/slurm/<job-name>-<job id>.out and logs/slurm/<job id>/process_<rank>.log.
set -euo pipefail

usage() {
  echo "slurm.sh: $1" >&2
  echo "usage: launch/slurm.sh --nodes N [--gpus-per-node 8] [--per gpu|node] [--partition P] [--account A]" >&2
  echo "       [--time T] [--job-name jaxft] [--dry-run] -- TRAIN_ARGS..." >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR source=dry_run.sh
. "$(dirname "${BASH_SOURCE[0]}")/dry_run.sh"

nodes="" gpus=8 per=gpu partition="" account="" time_limit="" job_name=jaxft dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --) shift; train_args=("$@"); break ;;
    --dry-run) dry_run=1; shift ;;
    --nodes | --gpus-per-node | --per | --partition | --account | --time | --job-name)
      [[ $# -ge 2 ]] || usage "$1 needs a value"
      case $1 in
        --nodes) nodes=$2 ;;
        --gpus-per-node) gpus=$2 ;;
        --per) per=$2 ;;
        --partition) partition=$2 ;;
        --account) account=$2 ;;
        --time) time_limit=$2 ;;
        --job-name) job_name=$2 ;;
      esac
      shift 2 ;;
    *) usage "unknown option '$1' (training arguments go after --)" ;;
  esac
done
[[ -n $nodes ]] || usage "--nodes is required"
[[ $nodes =~ ^[1-9][0-9]*$ && $gpus =~ ^[1-9][0-9]*$ ]] || usage "--nodes and --gpus-per-node must be positive integers"
[[ $per == gpu || $per == node ]] || usage "--per must be gpu or node"
((${#train_args[@]})) || usage "the training arguments go after -- (--config ... --workdir ...)"

tasks=$gpus
[[ $per == gpu ]] || tasks=1
opts=("--job-name=$job_name" "--nodes=$nodes" "--gpus-per-node=$gpus" "--ntasks-per-node=$tasks")
[[ -z $partition ]] || opts+=("--partition=$partition")
[[ -z $account ]] || opts+=("--account=$account")
[[ -z $time_limit ]] || opts+=("--time=$time_limit")

# sbatch does not create the directory of --output; the job fails silently without it.
run mkdir -p logs/slurm
# sbatch hands the arguments after the script to it as "$@", unparsed: no quoting layer to get wrong.
run sbatch "${opts[@]}" "$(dirname "$0")/slurm.sbatch" "${train_args[@]}"
