"""Where this process sits in the job: rank discovery for every launcher, before any process group starts.

    from pretrain.distributed_env import discover_ranks
    layout = discover_ranks()   # sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT

torch.distributed (and DeepSpeed on top of it) reads the five variables above. Launchers export
different things, so they are filled in from the first source that is present, in this order:

  1. "torchrun"  torchrun, `deepspeed` (its local launcher and pdsh/ssh runner) and any launcher that
                 already exports RANK and WORLD_SIZE. Taken as they are.
  2. "slurm"     a task started by `srun`: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and the first
                 host of SLURM_JOB_NODELIST as the master (expanded by `scontrol show hostnames` when
                 it is installed, else by the parser below). A process that Open MPI's `mpirun` started
                 inside an allocation also sees SLURM_PROCID, but it holds the *node* index of mpirun's
                 daemon there, not the rank, so such a process goes to MPI.
  3. "mpi"       `mpirun` (Open MPI, MPICH, Intel MPI): like DeepSpeed's MPI discovery, through mpi4py:
                 COMM_WORLD gives rank and size, an all-gather of host names gives the local rank and
                 whether all ranks share one host; the master is 127.0.0.1 then, else rank 0's address
                 (`hostname -I`), broadcast. Without mpi4py, the launcher's environment
                 (OMPI_COMM_WORLD_*, PMI_*) is read instead.
  4. "single"    none of the above: a world of one on 127.0.0.1 and a free port.

MASTER_ADDR / MASTER_PORT already in the environment always win (a launch script may pin them);
otherwise the port is 29500, or under Slurm 10000 + job id mod 50000 (the same on every task of a
job, different for jobs sharing a node).

Every rank logs one line with what it found (`ranks: rank 1 of 2 | local 1 | host vm | master
127.0.0.1:29500 | from slurm`), on every rank, so a wrong layout is visible at the start of a job.
A launch that contradicts itself (rank >= world size, missing sizes) raises ConfigError.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from typing import MutableMapping

from cheems_parallel.config import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500
LOOPBACK = "127.0.0.1"


# ----------------------------------------------------------------------------------------------
# Slurm node lists
# ----------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split "a[1-2,5],b" on the commas that are outside brackets."""
    parts, depth, start = [], 0, 0
    for index, character in enumerate(text):
        if character == "[":
            depth += 1
        elif character == "]":
            depth -= 1
        elif character == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand_host_pattern(pattern: str) -> list[str]:
    """"node[01-03]-ib" -> node01-ib, node02-ib, node03-ib; several bracket groups multiply."""
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    prefix, suffix = pattern[:match.start()], pattern[match.end():]
    hosts = []
    for item in match.group(1).split(","):
        if "-" in item:
            low, high = item.split("-", 1)
            width = len(low)  # Slurm keeps leading zeros: node[08-10] -> node08, node09, node10
            numbers = [str(number).zfill(width) for number in range(int(low), int(high) + 1)]
        else:
            numbers = [item]
        for number in numbers:
            hosts.extend(_expand_host_pattern(prefix + number + suffix))
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """All host names of a Slurm node list such as "gpu[001-004,010],login1" (in Slurm's order)."""
    try:
        return [host for part in _split_top_level(nodelist.strip()) for host in _expand_host_pattern(part)]
    except ValueError:
        raise ConfigError(f"environment: SLURM_JOB_NODELIST={nodelist!r} is not a Slurm node list") from None


def first_host(nodelist: str) -> str:
    """The first host of a node list: `scontrol show hostnames` when available, else expand_nodelist."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                    timeout=30, check=True)
            hosts = result.stdout.split()
            if hosts:
                return hosts[0]
        except (subprocess.SubprocessError, OSError):
            pass  # scontrol present but not configured (no slurm.conf): the parser gives the same answer
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ConfigError("environment: SLURM_JOB_NODELIST is empty; run under srun inside an allocation")
    return hosts[0]


# ----------------------------------------------------------------------------------------------
# The sources, in the order they are tried
# ----------------------------------------------------------------------------------------------

def _integer(environ, name: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment: {name}={value!r} is not an integer") from None


def _from_torchrun(environ) -> dict:
    if "WORLD_SIZE" not in environ:
        raise ConfigError("environment: RANK is set but WORLD_SIZE is not; the launcher must export both")
    # torchrun and deepspeed always export LOCAL_RANK; launchers that do not (Kubeflow's PyTorchJob)
    # run one process per pod, which is local rank 0.
    local_rank = _integer(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
    return {"rank": _integer(environ, "RANK"), "world_size": _integer(environ, "WORLD_SIZE"),
            "local_rank": local_rank, "master_addr": environ.get("MASTER_ADDR", LOOPBACK),
            "master_port": environ.get("MASTER_PORT", str(DEFAULT_MASTER_PORT)), "source": "torchrun"}


def _in_srun_step(environ) -> bool:
    # The batch script itself also has SLURM_PROCID=0 and SLURM_NTASKS=N, but it is not a task:
    # only srun sets SLURM_STEP_ID. Under Open MPI's mpirun, SLURM_PROCID is a node index (see top).
    return ("SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ
            and "OMPI_COMM_WORLD_SIZE" not in environ and "PMI_SIZE" not in environ)


def _from_slurm(environ) -> dict:
    for name in ("SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST"):
        if name not in environ:
            raise ConfigError(f"environment: SLURM_PROCID is set but {name} is not; start the tasks with srun")
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    else:
        master_addr = first_host(environ["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" in environ:
        master_port = environ["MASTER_PORT"]
    else:
        master_port = str(10000 + _integer(environ, "SLURM_JOB_ID") % 50000) if "SLURM_JOB_ID" in environ \
            else str(DEFAULT_MASTER_PORT)
    return {"rank": _integer(environ, "SLURM_PROCID"), "world_size": _integer(environ, "SLURM_NTASKS"),
            "local_rank": _integer(environ, "SLURM_LOCALID"), "master_addr": master_addr,
            "master_port": master_port, "source": "slurm"}


MPI_ENVIRONMENTS = (  # (rank, size, local rank, local size) as each MPI's launcher exports them
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),   # MPICH hydra, Intel MPI
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
)


def _launched_by_mpi(environ) -> bool:
    return any(rank in environ and size in environ for rank, size, _, _ in MPI_ENVIRONMENTS)


def _own_address() -> str:
    """This host's first address as `hostname -I` prints it (what DeepSpeed's MPI discovery uses)."""
    try:
        addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10).stdout.split()
        if addresses:
            return addresses[0]
    except (subprocess.SubprocessError, OSError):
        pass
    return socket.gethostbyname(socket.gethostname())


def _from_mpi4py(environ) -> dict:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    hosts = world.allgather(MPI.Get_processor_name())
    local_rank = hosts[:rank].count(hosts[rank])
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    elif len(set(hosts)) == 1:
        master_addr = LOOPBACK   # one host: keep the rendezvous off the network
    else:
        master_addr = world.bcast(_own_address() if rank == 0 else None, root=0)
    return {"rank": rank, "world_size": size, "local_rank": local_rank, "master_addr": master_addr,
            "master_port": environ.get("MASTER_PORT", str(DEFAULT_MASTER_PORT)), "source": "mpi"}


def _from_mpi_environment(environ) -> dict:
    for rank_name, size_name, local_rank_name, local_size_name in MPI_ENVIRONMENTS:
        if rank_name in environ and size_name in environ:
            size = _integer(environ, size_name)
            local_rank = _integer(environ, local_rank_name) if local_rank_name in environ else 0
            one_host = local_size_name in environ and _integer(environ, local_size_name) == size
            if "MASTER_ADDR" in environ:
                master_addr = environ["MASTER_ADDR"]
            elif one_host:
                master_addr = LOOPBACK
            else:
                raise ConfigError(f"environment: {size_name}={size} ranks on several hosts and no mpi4py to find "
                                  "rank 0's address; install mpi4py or export MASTER_ADDR (mpirun -x MASTER_ADDR=...)")
            return {"rank": _integer(environ, rank_name), "world_size": size, "local_rank": local_rank,
                    "master_addr": master_addr,
                    "master_port": environ.get("MASTER_PORT", str(DEFAULT_MASTER_PORT)), "source": "mpi"}
    raise AssertionError("called without an MPI environment")


def world_size_of(environ) -> int:
    """The world size discover_ranks will find, without side effects (no mpi4py, nothing exported). A
    torchrun-style launch is read by discover_ranks' own parser and checks (a RANK without WORLD_SIZE, a
    non-integer, a rank outside the world are ConfigErrors here already); an MPI or Slurm launch that is
    unreadable counts as 1 (discover_ranks then names the problem)."""
    if "RANK" in environ:
        layout = _from_torchrun(environ)
        _check_layout(layout)
        return layout["world_size"]
    if _in_srun_step(environ):
        names = ["SLURM_NTASKS"]
    else:
        names = [size for rank, size, _, _ in MPI_ENVIRONMENTS if rank in environ and size in environ][:1]
    value = environ.get(names[0], "") if names else ""
    return int(value) if value.isdigit() else 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------

def discover_ranks(environ: MutableMapping[str, str] | None = None, use_mpi4py: bool = True,
                   announce: bool = True) -> dict:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT into `environ` (default os.environ).

    Returns {"rank", "world_size", "local_rank" (ints), "master_addr", "master_port" (str), "source"}
    with source one of "torchrun", "slurm", "mpi", "single". `use_mpi4py=False` reads an MPI launch
    from its environment variables only (for tests; mpi4py initialises MPI). Raises ConfigError
    when the launch contradicts itself.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        layout = _from_torchrun(environ)
    elif _in_srun_step(environ):
        layout = _from_slurm(environ)
    elif _launched_by_mpi(environ):
        layout = _from_mpi4py(environ) if use_mpi4py and _mpi4py_available() else _from_mpi_environment(environ)
    else:
        layout = {"rank": 0, "world_size": 1, "local_rank": 0,
                  "master_addr": environ.get("MASTER_ADDR", LOOPBACK),
                  "master_port": environ.get("MASTER_PORT", str(_free_port())), "source": "single"}

    _check_layout(layout)
    environ.update({"RANK": str(layout["rank"]), "WORLD_SIZE": str(layout["world_size"]),
                    "LOCAL_RANK": str(layout["local_rank"]), "MASTER_ADDR": layout["master_addr"],
                    "MASTER_PORT": str(layout["master_port"])})
    if announce:
        _announce(layout)
    return layout


def _check_layout(layout: dict) -> None:
    if layout["world_size"] < 1 or not 0 <= layout["rank"] < layout["world_size"]:
        raise ConfigError(f"environment: rank {layout['rank']} of world size {layout['world_size']} (from "
                          f"{layout['source']}) is impossible; check the launcher's task count")
    if layout["local_rank"] < 0 or layout["local_rank"] > layout["rank"]:
        raise ConfigError(f"environment: local rank {layout['local_rank']} with global rank {layout['rank']} "
                          f"(from {layout['source']}) is impossible")


def _mpi4py_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def describe(layout: dict) -> str:
    return (f"ranks: rank {layout['rank']} of {layout['world_size']} | local {layout['local_rank']} | "
            f"host {socket.gethostname()} | master {layout['master_addr']}:{layout['master_port']} | "
            f"from {layout['source']}")


def _announce(layout: dict) -> None:
    # Every rank prints its own line (the trainer's console shows rank 0 only), so this logger has
    # its own handler and does not depend on how the root logger was configured for the rank.
    announcer = logging.getLogger(__name__ + ".layout")
    if not announcer.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        announcer.addHandler(handler)
        announcer.setLevel(logging.INFO)
        announcer.propagate = False
    announcer.info(describe(layout))
