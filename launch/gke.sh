#!/usr/bin/env bash
# Runs jaxft on a multi-host TPU slice in GKE: fills in launch/gke/jobset.yaml and applies it. Each
# TPU host gets one pod running `python -m jaxft.train TRAIN_ARGS`; the bucket is mounted at /gcs
# (put the workdir there) and each pod's log is also kept in gs://BUCKET/logs/NAME/.
#
#   launch/gke.sh --name NAME --image IMAGE --bucket BUCKET --accelerator ACC --topology TOPO
#                 [--chips-per-host 4] [--hosts N] [--service-account SA] [--max-restarts 0]
#                 [--dry-run] -- TRAIN_ARGS...
#
# --hosts defaults to the chips in TOPO / --chips-per-host (4x4 / 4 -> 4 hosts). --dry-run prints the
# rendered manifest as the kubectl command that would apply it.
set -euo pipefail

usage() {
  echo "gke.sh: $1" >&2
  echo "usage: launch/gke.sh --name NAME --image IMAGE --bucket BUCKET --accelerator ACC --topology TOPO" >&2
  echo "       [--chips-per-host 4] [--hosts N] [--service-account SA] [--max-restarts 0] [--dry-run] -- TRAIN_ARGS..." >&2
  exit 2
}

name="" image="" bucket="" accelerator="" topology="" chips=4 hosts="" service_account=default max_restarts=0 dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --) shift; train_args=("$@"); break ;;
    --dry-run) dry_run=1; shift ;;
    --name | --image | --bucket | --accelerator | --topology | --chips-per-host | --hosts | --service-account | --max-restarts)
      [[ $# -ge 2 ]] || usage "$1 needs a value"
      case $1 in
        --name) name=$2 ;;
        --image) image=$2 ;;
        --bucket) bucket=$2 ;;
        --accelerator) accelerator=$2 ;;
        --topology) topology=$2 ;;
        --chips-per-host) chips=$2 ;;
        --hosts) hosts=$2 ;;
        --service-account) service_account=$2 ;;
        --max-restarts) max_restarts=$2 ;;
      esac
      shift 2 ;;
    *) usage "unknown option '$1' (training arguments go after --)" ;;
  esac
done
for opt in name image bucket accelerator topology; do
  [[ -n ${!opt} ]] || usage "--$opt is required"
done
# Kubernetes names pods after the JobSet: lower-case letters, digits and dashes only.
[[ $name =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] || usage "--name must be lower-case letters, digits and '-', at most 40"
[[ $topology =~ ^[1-9][0-9]*(x[1-9][0-9]*)+$ ]] || usage "--topology must look like 4x4 or 2x2x4"
[[ $chips =~ ^[1-9][0-9]*$ && $max_restarts =~ ^[0-9]+$ ]] || usage "--chips-per-host and --max-restarts must be integers"
if [[ -z $hosts ]]; then
  hosts=$((${topology//x/*} / chips))
  ((hosts >= 1)) || usage "topology $topology has fewer chips than one host's $chips"
fi
[[ $hosts =~ ^[1-9][0-9]*$ ]] || usage "--hosts must be a positive integer"
((${#train_args[@]})) || usage "the training arguments go after -- (--config ... --workdir /gcs/...)"

# printf %q quotes each argument for the pod's bash, so spaces and quotes arrive unchanged. The pod's
# bash is PID 1: it gets Kubernetes' SIGTERM (preemption, eviction, a JobSet restart) and passes it to
# python, which saves a checkpoint and exits 75 within the grace period (gke/jobset.yaml); the pod's exit
# status is python's, so a failed or preempted host restarts the JobSet, which resumes. Output goes
# through tee (-a: a restart appends) by process substitution, so $! is python itself.
logs=/gcs/logs/$name
# shellcheck disable=SC2016  # $(hostname), $! and $pid expand in each pod
command="mkdir -p $logs; python -m jaxft.train$(printf ' %q' "${train_args[@]}")"' > >(tee -a '"$logs"'/$(hostname).log) 2>&1 & pid=$!; trap '"'"'kill -TERM $pid'"'"' TERM INT; wait $pid; status=$?; while kill -0 $pid 2>/dev/null; do wait $pid; status=$?; done; exit $status'

manifest=$(<"$(dirname "$0")/gke/jobset.yaml")
for key in NAME IMAGE BUCKET ACCELERATOR TOPOLOGY CHIPS_PER_HOST HOSTS SERVICE_ACCOUNT MAX_RESTARTS COMMAND; do
  case $key in
    NAME) value=$name ;; IMAGE) value=$image ;; BUCKET) value=$bucket ;; ACCELERATOR) value=$accelerator ;;
    TOPOLOGY) value=$topology ;; CHIPS_PER_HOST) value=$chips ;; HOSTS) value=$hosts ;;
    SERVICE_ACCOUNT) value=$service_account ;; MAX_RESTARTS) value=$max_restarts ;; COMMAND) value=$command ;;
  esac
  # Quoted pattern and replacement: no globbing, and no '&' expansion (bash 5.2 patsub_replacement).
  # COMMAND comes last, so a "{{...}}" inside a training argument is never replaced.
  manifest=${manifest//"{{$key}}"/"$value"}
done

if ((dry_run)); then
  printf "kubectl apply -f - <<'EOF'\n%s\nEOF\n" "$manifest"
else
  printf '%s\n' "$manifest" | kubectl apply -f -
  echo "gke.sh: logs: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$name --prefix --max-log-requests $((hosts + 1))" >&2
fi
