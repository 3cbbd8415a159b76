"""The launch/ scripts' argument handling, without starting anything (--dry-run and user mistakes).

The scripts are run for real by tests/integration/test_launchers.py; here: the command each one
builds, the environment file for DeepSpeed's multi-node runners, and that every user mistake is one
line naming the option (or the hostfile line) with exit status 2.
"""
import shlex
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
LAUNCH = REPOSITORY / "launch"
CONFIG = str(REPOSITORY / "configs" / "cheems-tiny.yaml")


def script(name, *arguments, environment=None):
    import os
    return subprocess.run([str(LAUNCH / name), *arguments], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, **(environment or {})), cwd=REPOSITORY)


def test_deepspeed_dry_run_builds_the_command_and_environment_file(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8  # first node is the master\nnode2 slots=8\n")
    result = script("deepspeed_hostfile.sh", "--hostfile", str(hostfile), "--config", CONFIG, "--exclude", "node2:7",
                    "--master-addr", "node1", "--master-port", "29600", "--env", "NCCL_IB_HCA=mlx5_0",
                    "--env", "CHEEMS_NOTE=a b", "--dry-run", "--", "--set", "train.steps=5",
                    environment={"GLOO_SOCKET_IFNAME": "ib0"})
    assert result.returncode == 0, result.stderr
    comments = [line[4:] for line in result.stdout.splitlines() if line.startswith("#   ")]
    assert "NCCL_IB_HCA=mlx5_0" in comments and "CHEEMS_NOTE=a b" in comments and "GLOO_SOCKET_IFNAME=ib0" in comments
    command = shlex.split(result.stdout.splitlines()[-1])
    assert command[1:3] == ["-m", "deepspeed.launcher.runner"]
    joined = " ".join(command)
    for fragment in ("--master_port 29600", "--master_addr node1", "--exclude node2:7",
                     f"--module pretrain --config {CONFIG} --set train.steps=5"):
        assert fragment in joined
    assert "--no_ssh_check" not in command, "a real multi-node hostfile must keep DeepSpeed's ssh check"


def test_deepspeed_local_hostfile_needs_no_ssh(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    result = script("deepspeed_hostfile.sh", "--hostfile", str(hostfile), "--config", CONFIG, "--dry-run")
    command = shlex.split(result.stdout.splitlines()[-1])
    assert "--no_ssh_check" in command and command[command.index("--master_addr") + 1] == "127.0.0.1"


def test_mpirun_dry_run(tmp_path):
    result = script("mpirun.sh", "--np", "16", "--npernode", "8", "--hostfile", str(LAUNCH / "hostfile.example"),
                    "--interface", "ib0", "--master-port", "29700", "--config", CONFIG, "--dry-run",
                    "--", "--set", "train.steps=5", environment={"NCCL_DEBUG": "WARN"})
    assert result.returncode == 0, result.stderr
    joined = result.stdout.strip()
    for fragment in ("mpirun -np 16", "--npernode 8", "--mca btl_tcp_if_include ib0", "--mca oob_tcp_if_include ib0",
                     "-x MASTER_PORT", "-x GLOO_SOCKET_IFNAME", "-x NCCL_DEBUG",
                     f"-m pretrain --config {CONFIG} --set train.steps=5"):
        assert fragment in joined, fragment


def test_slurm_submit_dry_run(tmp_path):
    result = script("slurm_submit.sh", "--nodes", "4", "--gpus-per-node", "8", "--config", CONFIG, "--time", "1-00:00:00",
                    "--partition", "gpu", "--log-dir", str(tmp_path / "logs"), "--dry-run", "--", "--set", "train.steps=5")
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.strip())
    for option in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=1-00:00:00",
                   "--signal=B:USR1@300", "--partition=gpu", f"--output={tmp_path / 'logs'}/%x-%j.out"):
        assert option in command, option
    assert command[command.index(str(LAUNCH / "slurm_pretrain.sbatch")) + 1:] == ["--config", CONFIG, "--set",
                                                                                  "train.steps=5"]


def test_sbatch_script_refuses_to_run_outside_slurm():
    result = subprocess.run(["bash", str(LAUNCH / "slurm_pretrain.sbatch"), "--config", CONFIG], capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "submit it with sbatch" in result.stderr


@pytest.mark.parametrize("name,arguments,fragment", [
    ("deepspeed_hostfile.sh", ["--config", CONFIG], "--hostfile is required"),
    ("deepspeed_hostfile.sh", ["--hostfile", "BAD", "--config", CONFIG], "bad.hosts:2: 'node2 slot=8' is not"),
    ("deepspeed_hostfile.sh", ["--hostfile", "TWICE", "--config", CONFIG], "twice.hosts:3: host node1 is listed twice"),
    ("deepspeed_hostfile.sh", ["--hostfile", str(LAUNCH / "hostfile.example"), "--config", CONFIG,
                               "--include", "node1", "--exclude", "node2"], "cannot be combined"),
    ("deepspeed_hostfile.sh", ["--hostfile", str(LAUNCH / "hostfile.example"), "--config", "nope.yaml"],
     "--config nope.yaml: no such file"),
    ("deepspeed_hostfile.sh", ["--hostfile", str(LAUNCH / "hostfile.example"), "--config", CONFIG, "--env", "X"],
     "--env X: want NAME=VALUE"),
    ("mpirun.sh", ["--config", CONFIG], "--np <missing>: need a positive integer"),
    ("mpirun.sh", ["--np", "2", "--config", CONFIG, "--bogus"], "unknown option '--bogus'"),
    ("slurm_submit.sh", ["--nodes", "two", "--config", CONFIG], "--nodes two: need a positive integer"),
    ("slurm_submit.sh", ["--nodes", "1"], "--config is required"),
    # found by the CLI audit: bash's own "line 57: 2: parameter null or not set" (status 1), cat's
    # "Is a directory", mkdir's "File exists", or a contradiction passed on silently
    ("deepspeed_hostfile.sh", ["--hostfile", str(LAUNCH / "hostfile.example"), "--config"], "--config needs a value"),
    ("mpirun.sh", ["--np", "2", "--config"], "--config needs a value"),
    ("slurm_submit.sh", ["--config", CONFIG, "--time"], "--time needs a value"),
    ("deepspeed_hostfile.sh", ["--hostfile", str(LAUNCH), "--config", CONFIG], "is a directory, not a hostfile"),
    ("deepspeed_hostfile.sh", ["--hostfile", "ZERO", "--config", CONFIG], "zero.hosts:1: node1 has slots=0"),
    ("deepspeed_hostfile.sh", ["--hostfile", str(LAUNCH / "hostfile.example"), "--config", CONFIG,
                               "--master-port", "99999"], "--master-port 99999: need a port number (1-65535)"),
    ("deepspeed_hostfile.sh", ["--hostfile", str(LAUNCH / "hostfile.example"), "--config", CONFIG,
                               "--num-gpus", "all"], "--num-gpus all: need a positive integer"),
    ("mpirun.sh", ["--np", "2", "--npernode", "x", "--config", CONFIG], "--npernode x: need a positive integer"),
    ("slurm_submit.sh", ["--gpus-per-node", "8", "--tasks-per-node", "2", "--config", CONFIG, "--dry-run"],
     "with --gpus-per-node 8 there is one task per GPU"),
    ("slurm_submit.sh", ["--config", CONFIG, "--log-dir", CONFIG, "--dry-run"], "exists and is not a directory"),
    ("slurm_submit.sh", ["--config", CONFIG, "--cpus-per-task", "many", "--dry-run"],
     "--cpus-per-task many: need a positive integer"),
])
def test_user_mistakes_are_one_line_with_status_2(name, arguments, fragment, tmp_path):
    bad = tmp_path / "bad.hosts"
    bad.write_text("node1 slots=8\nnode2 slot=8\n")
    twice = tmp_path / "twice.hosts"
    twice.write_text("node1 slots=8\n# a comment\nnode1 slots=4\n")
    zero = tmp_path / "zero.hosts"
    zero.write_text("node1 slots=0\nnode2 slots=8\n")
    arguments = [{"BAD": str(bad), "TWICE": str(twice), "ZERO": str(zero)}.get(argument, argument)
                 for argument in arguments]
    result = script(name, *arguments)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_slurm_submit_without_sbatch_is_one_line(tmp_path):
    """No sbatch on PATH (not a Slurm login node): bash's 'sbatch: command not found', status 127, before."""
    import shutil
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "dirname", "basename", "mkdir", "sed", "cat"):
        (tools / tool).symlink_to(shutil.which(tool))
    result = subprocess.run([str(tools / "bash"), str(LAUNCH / "slurm_submit.sh"), "--config", CONFIG,
                             "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, timeout=60,
                            env={"PATH": str(tools)}, cwd=REPOSITORY)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {LAUNCH / 'slurm_submit.sh'}: sbatch not found; run this on a Slurm login node (or use --dry-run)"]


@pytest.mark.parametrize("name", ["deepspeed_hostfile.sh", "mpirun.sh", "slurm_submit.sh"])
def test_help_is_the_header_comment_and_the_options(name):
    result = script(name, "--help")
    header = [line[2:] if line.startswith("# ") else line[1:]
              for line in (LAUNCH / name).read_text().splitlines()[1:] if line.startswith("#")][:3]
    assert result.returncode == 0 and result.stdout.startswith(header[0]) and "Options:" in result.stdout
    assert "set -euo" not in result.stdout and "#!/" not in result.stdout   # no script lines in the help
