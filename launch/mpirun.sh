#!/bin/bash
# Launch pretraining with Open MPI's mpirun: one rank per GPU, ranks found through mpi4py.
#
#   launch/mpirun.sh --np 16 --hostfile hosts.mpi --npernode 8 --config configs/cheems-320m.yaml \
#       --interface ib0 -- --set logging.run_dir=runs/320m
#   launch/mpirun.sh --np 2 --interface lo --config configs/cheems-tiny.yaml     # one machine, loopback
#
# Each rank runs `python -m pretrain`; pretrain.distributed_env sees OMPI_COMM_WORLD_* and asks mpi4py
# (as DeepSpeed's MPI discovery does): COMM_WORLD gives rank and size, an all-gather of host names
# the local rank; the master is 127.0.0.1 when every rank is on one host, else rank 0's address,
# broadcast. MASTER_PORT (--master-port, default 29500) and MASTER_ADDR, when set, are passed on.
#
# Open MPI's hostfile format is "<host> slots=<N>" (the same lines as a DeepSpeed hostfile).
# --interface restricts both MPI's own TCP traffic and gloo's to one network interface (NCCL picks
# its own: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA, see README.md, "Launching on clusters"). Variables named in FORWARDED
# and every NCCL_* variable set here are exported to all ranks with -x.
# Everything after `--` goes to `python -m pretrain`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

FORWARDED=(PATH LD_LIBRARY_PATH PYTHONPATH MASTER_ADDR MASTER_PORT OMP_NUM_THREADS GLOO_SOCKET_IFNAME
           CUDA_DEVICE_MAX_CONNECTIONS PYTORCH_CUDA_ALLOC_CONF TORCH_NCCL_ASYNC_ERROR_HANDLING
           TORCH_EXTENSIONS_DIR TRITON_CACHE_DIR)

usage() {
    header_help
    cat <<'HELP'
Options:
  --np N                total ranks (required)
  --config FILE         pretrain YAML config (required)
  --hostfile FILE       Open MPI hostfile ("host slots=N"); default: this machine only
  --npernode N          ranks per node (default: fill each host's slots in order)
  --interface IF        network interface for MPI's TCP and gloo (e.g. ib0, eth0, lo)
  --master-port PORT    rendezvous port (default: MASTER_PORT or 29500)
  --oversubscribe       allow more ranks than cores (CPU tests)
  --mpirun-args "..."   extra arguments for mpirun, word-split (e.g. "--mca pml ucx")
  --python PATH         interpreter on every node (default: the one in .venv when present, else python3)
  --dry-run             print the mpirun command, run nothing
  -h, --help            this help
HELP
}


np="" config="" hostfile="" npernode="" interface="" oversubscribe=0 mpirun_args="" python="" dry_run=0
export MASTER_PORT=${MASTER_PORT:-29500}
while [[ $# -gt 0 ]]; do
    case "$1" in
        --np) need_value "$@"; np=$2; shift 2 ;;
        --config) need_value "$@"; config=$2; shift 2 ;;
        --hostfile) need_value "$@"; hostfile=$2; shift 2 ;;
        --npernode) need_value "$@"; npernode=$2; shift 2 ;;
        --interface) need_value "$@"; interface=$2; shift 2 ;;
        --master-port) need_value "$@"; MASTER_PORT=$2; shift 2 ;;
        --oversubscribe) oversubscribe=1; shift ;;
        --mpirun-args) need_value "$@"; mpirun_args=$2; shift 2 ;;
        --python) need_value "$@"; python=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (pretrain arguments go after --; see --help)" ;;
    esac
done

require_positive --np "$np"
require_config "$config"
[[ -z "$hostfile" || -r "$hostfile" ]] || die "--hostfile $hostfile: cannot read it"
require_port --master-port "$MASTER_PORT"
optional_positive --npernode "$npernode"
[[ ! -d "${hostfile:-}" ]] || die "--hostfile $hostfile: is a directory, not a hostfile"
command -v mpirun >/dev/null || die "mpirun not found; install Open MPI (apt-get install openmpi-bin libopenmpi-dev)"
python=${python:-$python_default}

command=(mpirun -np "$np" --bind-to none --map-by slot)
[[ $(id -u) == 0 ]] && command+=(--allow-run-as-root)   # containers and CI run as root
[[ -n "$hostfile" ]] && command+=(--hostfile "$hostfile")
[[ -n "$npernode" ]] && command+=(--npernode "$npernode")
[[ "$oversubscribe" == 1 ]] && command+=(--oversubscribe)
if [[ -n "$interface" ]]; then
    # MPI's runtime (oob) and point-to-point (btl) traffic, and gloo's sockets, on that interface only.
    command+=(--mca oob_tcp_if_include "$interface" --mca btl_tcp_if_include "$interface")
    export GLOO_SOCKET_IFNAME=$interface
fi
for name in "${FORWARDED[@]}"; do
    [[ -n "${!name:-}" ]] && command+=(-x "$name")
done
while IFS= read -r name; do command+=(-x "$name"); done < <(compgen -e | grep '^NCCL_' || true)
# shellcheck disable=SC2206  # --mpirun-args is meant to be word-split
[[ -n "$mpirun_args" ]] && command+=($mpirun_args)
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
command+=(--wdir "$root" "$python" -m pretrain --config "$config" "$@")

if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
cd "$root"
"${command[@]}"
