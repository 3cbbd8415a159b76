#!/bin/bash
# Submit launch/slurm_pretrain.sbatch with the resources spelled out: nodes, GPUs per node, config.
#
#   launch/slurm_submit.sh --nodes 4 --gpus-per-node 8 --config configs/cheems-320m.yaml \
#       --time 24:00:00 --partition gpu -- --set logging.run_dir=runs/320m
#   launch/slurm_submit.sh --nodes 1 --gpus-per-node 0 --tasks-per-node 2 \
#       --config configs/cheems-tiny.yaml            # CPU-only nodes: 2 ranks per node
#
# One task per GPU (--ntasks-per-node = --gpus-per-node). Prints the job id (sbatch --parsable).
# Everything after `--` goes to `python -m pretrain`. The log is <log dir>/<job name>-<job id>.out,
# one file per job, appended to by every restart of it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
    header_help
    cat <<'HELP'
Options:
  --nodes N             nodes to allocate (default 1)
  --gpus-per-node G     GPUs per node = ranks per node (default 8); 0 = CPU nodes, then --tasks-per-node
  --tasks-per-node T    ranks per node when --gpus-per-node 0 (default 1)
  --cpus-per-task C     cores per rank (sets OMP_NUM_THREADS too; default: Slurm's)
  --config FILE         pretrain YAML config (required)
  --time T              time limit (HH:MM:SS or D-HH:MM:SS); adds USR1 300 s before it: checkpoint + requeue
  --partition P         Slurm partition;  --account A  account;  --qos Q  quality of service
  --job-name NAME       job name (default cheems-pretrain); the log is logs/slurm/NAME-<job id>.out
  --log-dir DIR         where the job log goes (default logs/slurm in the repository)
  --python PATH         interpreter on the nodes (default: the one in .venv when present, else python3)
  --dry-run             print the sbatch command instead of running it
  -h, --help            this help
HELP
}


nodes=1 gpus_per_node=8 tasks_per_node=1 cpus_per_task="" config="" time_limit="" partition="" account="" qos=""
job_name=cheems-pretrain python="" dry_run=0 log_dir="" tasks_given=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) need_value "$@"; nodes=$2; shift 2 ;;
        --gpus-per-node) need_value "$@"; gpus_per_node=$2; shift 2 ;;
        --tasks-per-node) need_value "$@"; tasks_per_node=$2; tasks_given=1; shift 2 ;;
        --cpus-per-task) need_value "$@"; cpus_per_task=$2; shift 2 ;;
        --config) need_value "$@"; config=$2; shift 2 ;;
        --time) need_value "$@"; time_limit=$2; shift 2 ;;
        --partition) need_value "$@"; partition=$2; shift 2 ;;
        --account) need_value "$@"; account=$2; shift 2 ;;
        --qos) need_value "$@"; qos=$2; shift 2 ;;
        --job-name) need_value "$@"; job_name=$2; shift 2 ;;
        --python) need_value "$@"; python=$2; shift 2 ;;
        --log-dir) need_value "$@"; log_dir=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (pretrain arguments go after --; see --help)" ;;
    esac
done

require_config "$config"
require_positive --nodes "$nodes"
[[ "$gpus_per_node" =~ ^[0-9]+$ ]] || die "--gpus-per-node $gpus_per_node: need an integer >= 0"
require_positive --tasks-per-node "$tasks_per_node"
[[ "$gpus_per_node" == 0 || "$tasks_given" == 0 ]] \
    || die "--tasks-per-node $tasks_per_node: with --gpus-per-node $gpus_per_node there is one task per GPU; use --tasks-per-node only with --gpus-per-node 0"
optional_positive --cpus-per-task "$cpus_per_task"
[[ "$dry_run" == 1 ]] || command -v sbatch >/dev/null || die "sbatch not found; run this on a Slurm login node (or use --dry-run)"
python=${python:-$python_default}

log_dir=${log_dir:-$root/logs/slurm}
[[ ! -e "$log_dir" || -d "$log_dir" ]] || die "--log-dir $log_dir: exists and is not a directory"
mkdir -p "$log_dir" 2>/dev/null || die "--log-dir $log_dir: cannot create it"   # Slurm does not create the log's directory; without it the job dies silently
log_dir=$(cd "$log_dir" && pwd)
options=(--parsable --job-name="$job_name" --nodes="$nodes" --chdir="$root" --output="$log_dir/%x-%j.out")
if [[ "$gpus_per_node" -gt 0 ]]; then
    options+=(--ntasks-per-node="$gpus_per_node" --gpus-per-node="$gpus_per_node")
else
    options+=(--ntasks-per-node="$tasks_per_node")
fi
[[ -n "$cpus_per_task" ]] && options+=(--cpus-per-task="$cpus_per_task")
[[ -n "$time_limit" ]] && options+=(--time="$time_limit" --signal=B:USR1@300)
[[ -n "$partition" ]] && options+=(--partition="$partition")
[[ -n "$account" ]] && options+=(--account="$account")
[[ -n "$qos" ]] && options+=(--qos="$qos")
# The config path is resolved here, where the user typed it; the job runs from the repository root.
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")

command=(sbatch "${options[@]}" --export="ALL,PYTHON=$python,CHEEMS_ROOT=$root"
         "$root/launch/slurm_pretrain.sbatch" --config "$config" "$@")
if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
"${command[@]}"
