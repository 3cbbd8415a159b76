#!/bin/bash
# Launch pretraining on the nodes of a DeepSpeed hostfile: `deepspeed --hostfile H --module pretrain`.
#
#   launch/deepspeed_hostfile.sh --hostfile launch/hostfile.example --config configs/cheems-320m.yaml \
#       --master-addr node1 -- --set logging.run_dir=runs/320m
#   launch/deepspeed_hostfile.sh --hostfile hosts --exclude "node3" --config configs/cheems-320m.yaml
#   launch/deepspeed_hostfile.sh --hostfile <(echo "localhost slots=2") --config configs/cheems-tiny.yaml
#
# What it adds to a bare `deepspeed` call:
#   * runs from the repository root, so `--module pretrain` imports on every node;
#   * the master: --master-addr (or MASTER_ADDR; for a hostfile naming only this machine, 127.0.0.1,
#     otherwise DeepSpeed asks the first host for `hostname -I` over ssh), --master-port (or
#     MASTER_PORT, default 29500);
#   * a hostfile naming only this machine skips DeepSpeed's ssh check (no ssh server needed);
#   * the environment file: DeepSpeed's multi-node runners start the ranks through pdsh/ssh, which
#     drop the caller's environment. They re-export NCCL_* and PYTHON* themselves and every line
#     NAME=VALUE of `.deepspeed_env` (in ~ or the working directory). This script writes one such
#     file for the launch (DS_ENV_FILE points at it): your ~/.deepspeed_env and ./.deepspeed_env,
#     then each --env NAME=VALUE, then the variables in FORWARDED below that are set here.
#   * NCCL settings for InfiniBand clusters are documented in README.md ("Launching on clusters"); set them in the
#     environment (NCCL_* is forwarded) or with --env.
# Everything after `--` goes to `python -m pretrain`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

FORWARDED=(GLOO_SOCKET_IFNAME OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS PYTORCH_CUDA_ALLOC_CONF
           TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_EXTENSIONS_DIR TRITON_CACHE_DIR TORCH_CUDA_ARCH_LIST
           LD_LIBRARY_PATH)

usage() {
    header_help
    cat <<'HELP'
Options:
  --hostfile FILE       DeepSpeed hostfile ("host slots=N" lines; required)
  --config FILE         pretrain YAML config (required)
  --include SPEC        only these hosts/slots, e.g. "node1@node2:0,1" (deepspeed --include)
  --exclude SPEC        all but these hosts/slots, e.g. "node3@node1:7" (deepspeed --exclude)
  --num-nodes N         use the first N hosts;  --num-gpus G  G slots per host
  --master-addr ADDR    rendezvous host (default: MASTER_ADDR, 127.0.0.1 for a local-only hostfile,
                        else deepspeed's choice: `hostname -I` of the first host)
  --master-port PORT    rendezvous port (default: MASTER_PORT or 29500)
  --env NAME=VALUE      put a variable into the environment file for every rank (repeatable)
  --launcher NAME       deepspeed multi-node launcher: pdsh (default), openmpi, mvapich, slurm
  --python PATH         interpreter (default: the one in .venv when present, else python3)
  --dry-run             print the environment file and the deepspeed command, run nothing
  -h, --help            this help
HELP
}


hostfile="" config="" include="" exclude="" num_nodes="" num_gpus="" launcher=""
master_addr=${MASTER_ADDR:-} master_port=${MASTER_PORT:-29500} python="" dry_run=0 extra_env=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile) need_value "$@"; hostfile=$2; shift 2 ;;
        --config) need_value "$@"; config=$2; shift 2 ;;
        --include) need_value "$@"; include=$2; shift 2 ;;
        --exclude) need_value "$@"; exclude=$2; shift 2 ;;
        --num-nodes) need_value "$@"; num_nodes=$2; shift 2 ;;
        --num-gpus) need_value "$@"; num_gpus=$2; shift 2 ;;
        --master-addr) need_value "$@"; master_addr=$2; shift 2 ;;
        --master-port) need_value "$@"; master_port=$2; shift 2 ;;
        --env) [[ "${2:-}" == *=* ]] || die "--env ${2:-}: want NAME=VALUE"; extra_env+=("$2"); shift 2 ;;
        --launcher) need_value "$@"; launcher=$2; shift 2 ;;
        --python) need_value "$@"; python=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (pretrain arguments go after --; see --help)" ;;
    esac
done

[[ -n "$hostfile" ]] || die "--hostfile is required (see launch/hostfile.example)"
[[ ! -d "$hostfile" ]] || die "--hostfile $hostfile: is a directory, not a hostfile"
[[ -r "$hostfile" ]] || die "--hostfile $hostfile: cannot read it"
require_config "$config"
[[ -z "$include" || -z "$exclude" ]] || die "--include and --exclude cannot be combined (deepspeed refuses it)"
require_port --master-port "$master_port"
optional_positive --num-nodes "$num_nodes"
optional_positive --num-gpus "$num_gpus"
python=${python:-$python_default}

# Read the hostfile here (it may be a pipe) and check it, naming the line of a mistake.
hosts=() clean_lines=() line_number=0
hostfile_text=$(cat "$hostfile")
while IFS= read -r line || [[ -n "$line" ]]; do
    line_number=$((line_number + 1))
    line=${line%%#*}
    [[ -z "${line//[[:space:]]/}" ]] && continue
    [[ "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]] \
        || die "$hostfile:$line_number: '$line' is not '<host> slots=<N>'"
    [[ "${BASH_REMATCH[2]}" -gt 0 ]] || die "$hostfile:$line_number: ${BASH_REMATCH[1]} has slots=0 (leave the host out, or --exclude it)"
    for seen in "${hosts[@]}"; do
        [[ "$seen" == "${BASH_REMATCH[1]}" ]] && die "$hostfile:$line_number: host ${BASH_REMATCH[1]} is listed twice"
    done
    hosts+=("${BASH_REMATCH[1]}")
    clean_lines+=("${BASH_REMATCH[1]} slots=${BASH_REMATCH[2]}")
done <<< "$hostfile_text"
[[ ${#hosts[@]} -gt 0 ]] || die "$hostfile: no '<host> slots=<N>' line"
local_only=1
for host in "${hosts[@]}"; do
    case "$host" in localhost|127.0.0.1|"$(hostname)"|"$(hostname -s)") ;; *) local_only=0 ;; esac
done
[[ -z "$master_addr" && "$local_only" == 1 ]] && master_addr=127.0.0.1

run_dir=$(mktemp -d "${TMPDIR:-/tmp}/cheems-deepspeed.XXXXXX")
trap 'rm -rf "$run_dir"' EXIT
printf '%s\n' "${clean_lines[@]}" > "$run_dir/hostfile"   # comments dropped, checked above

# The environment file (DeepSpeed reads NAME=VALUE lines; a blank line would break its parser).
env_file="$run_dir/deepspeed_env"
: > "$env_file"
for existing in "$HOME/.deepspeed_env" "$root/.deepspeed_env"; do
    [[ -f "$existing" ]] && grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$existing" >> "$env_file" || true
done
for pair in "${extra_env[@]}"; do echo "$pair" >> "$env_file"; done
for name in "${FORWARDED[@]}"; do
    [[ -n "${!name:-}" ]] && echo "$name=${!name}" >> "$env_file"
done
# The local launch (one node) starts the ranks as children: give them the --env values directly.
for pair in "${extra_env[@]}"; do export "${pair?}"; done
export DS_ENV_FILE="$env_file"   # absolute, so DeepSpeed finds it whatever ~ and . are

command=("$python" -m deepspeed.launcher.runner --hostfile "$run_dir/hostfile" --master_port "$master_port")
[[ -n "$master_addr" ]] && command+=(--master_addr "$master_addr")
[[ "$local_only" == 1 ]] && command+=(--no_ssh_check)
[[ -n "$include" ]] && command+=(--include "$include")
[[ -n "$exclude" ]] && command+=(--exclude "$exclude")
[[ -n "$num_nodes" ]] && command+=(--num_nodes "$num_nodes")
[[ -n "$num_gpus" ]] && command+=(--num_gpus "$num_gpus")
[[ -n "$launcher" ]] && command+=(--launcher "$launcher")
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
command+=(--module pretrain --config "$config" "$@")

if [[ "$dry_run" == 1 ]]; then
    echo "# environment file (DS_ENV_FILE):"; sed 's/^/#   /' "$env_file"
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
cd "$root"
echo "deepspeed launch: hosts ${hosts[*]} | master ${master_addr:-<first host>}:$master_port | env file $env_file" >&2
"${command[@]}"
