"""pretrain.distributed_env.discover_ranks on the environments each launcher exports (env dicts).

The expected values are read off the variables each launcher documents; the node-list parser is
checked against `scontrol show hostnames` when Slurm is installed. The real launchers are run by
tests/integration/test_launchers.py.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from cheems_parallel.config import ConfigError
from pretrain.distributed_env import discover_ranks, expand_nodelist, first_host

EXPORTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def discover(environ, **options):
    layout = discover_ranks(environ, use_mpi4py=False, announce=False, **options)
    exported = {name: environ[name] for name in EXPORTED}
    assert exported == {"RANK": str(layout["rank"]), "WORLD_SIZE": str(layout["world_size"]),
                        "LOCAL_RANK": str(layout["local_rank"]), "MASTER_ADDR": layout["master_addr"],
                        "MASTER_PORT": str(layout["master_port"])}
    return layout


def test_torchrun_environment_is_taken_as_is():
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511",
               # srun and mpirun variables around a torchrun/deepspeed launch must not override it
               "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "OMPI_COMM_WORLD_RANK": "0"}
    layout = discover(environ)
    assert (layout["rank"], layout["world_size"], layout["local_rank"], layout["source"]) == (3, 4, 1, "torchrun")
    assert (layout["master_addr"], layout["master_port"]) == ("10.0.0.7", "29511")


def test_rank_without_local_rank_is_one_process_per_host():
    layout = discover({"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "pod-0", "MASTER_PORT": "23456"})
    assert (layout["rank"], layout["world_size"], layout["local_rank"]) == (5, 8, 0)


def test_slurm_task_under_srun():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
               "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08,11]"}
    layout = discover(environ)
    assert (layout["rank"], layout["world_size"], layout["local_rank"], layout["source"]) == (5, 8, 1, "slurm")
    assert layout["master_addr"] == "gpu07"
    assert layout["master_port"] == str(10000 + 123456 % 50000)


def test_slurm_master_pinned_by_the_script_wins():
    environ = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "3",
               "SLURM_JOB_NODELIST": "a1,b2", "MASTER_ADDR": "a1-ib", "MASTER_PORT": "30001"}
    layout = discover(environ)
    assert (layout["master_addr"], layout["master_port"]) == ("a1-ib", "30001")


def test_slurm_batch_shell_is_not_a_task():
    # The batch script has SLURM_PROCID=0 and SLURM_NTASKS=2 but no step: it must stay a world of one.
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n1"}
    assert discover(environ)["source"] == "single"


def test_open_mpi_one_host_uses_loopback():
    environ = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    layout = discover(environ)
    assert (layout["rank"], layout["world_size"], layout["local_rank"], layout["source"]) == (1, 2, 1, "mpi")
    assert (layout["master_addr"], layout["master_port"]) == ("127.0.0.1", "29500")


def test_mpirun_inside_slurm_allocation_goes_to_mpi():
    # Under Open MPI's mpirun in an allocation SLURM_PROCID is the node index of mpirun's daemon.
    environ = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
               "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "n1"}
    layout = discover(environ)
    assert (layout["rank"], layout["world_size"], layout["local_rank"], layout["source"]) == (3, 4, 1, "mpi")
    assert layout["master_addr"] == "n1"


def test_mpi_on_several_hosts_without_mpi4py_needs_master():
    environ = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        discover_ranks(environ, use_mpi4py=False, announce=False)


def test_mpi4py_singleton_world():
    """The mpi4py path itself (as under mpirun), here a singleton MPI world of one process.

    In a child process: MPI_Init in the test runner would stay initialised for every later test.
    """
    program = ("import json\n"
               "from pretrain.distributed_env import discover_ranks\n"
               "environ = {'OMPI_COMM_WORLD_RANK': '0', 'OMPI_COMM_WORLD_SIZE': '1'}\n"
               "print(json.dumps(discover_ranks(environ, announce=False)))\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    layout = json.loads(result.stdout.strip().splitlines()[-1])
    assert (layout["rank"], layout["world_size"], layout["local_rank"], layout["source"]) == (0, 1, 0, "mpi")
    assert layout["master_addr"] == "127.0.0.1"


def test_single_process_gets_a_world_of_one():
    layout = discover({})
    assert (layout["rank"], layout["world_size"], layout["local_rank"], layout["source"]) == (0, 1, 0, "single")
    assert layout["master_addr"] == "127.0.0.1" and int(layout["master_port"]) > 0


@pytest.mark.parametrize("environ,fragment", [
    ({"RANK": "0"}, "WORLD_SIZE is not"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 of world size 2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "SLURM_JOB_NODELIST is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "local rank 1 with global rank 0"),
])
def test_contradictory_launch_is_one_clear_error(environ, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        discover_ranks(environ, use_mpi4py=False, announce=False)


NODELISTS = [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[008-010,012],login1", ["gpu008", "gpu009", "gpu010", "gpu012", "login1"]),
    ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
    ("a[9-10],b", ["a9", "a10", "b"]),
    ("n[1-2][3-4]", ["n13", "n14", "n23", "n24"]),
]


@pytest.mark.parametrize("nodelist,hosts", NODELISTS)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.fixture(scope="module")
def scontrol():
    """Slurm's scontrol, apt-installed when missing (root, as in CI; the Slurm launcher tests install the same
    package): decided when the tests run, not at collection, so a fresh machine runs these too."""
    if shutil.which("scontrol") is None:
        from tests.integration.slurm_harness import SlurmUnavailable, ensure_installed
        try:
            ensure_installed()
        except SlurmUnavailable as error:
            pytest.skip(f"Slurm's scontrol is not installed: {error}")
    return shutil.which("scontrol")


@pytest.mark.parametrize("nodelist", [nodelist for nodelist, _ in NODELISTS])
def test_expand_nodelist_agrees_with_scontrol(nodelist, tmp_path, scontrol):
    # scontrol wants a slurm.conf even to expand a host list; a minimal one is enough.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=localhost\n")
    result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                            env=dict(os.environ, SLURM_CONF=str(conf)), timeout=30)
    assert result.returncode == 0 and result.stdout.split(), result.stderr
    assert expand_nodelist(nodelist) == result.stdout.split()
