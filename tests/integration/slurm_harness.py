"""A real one-node Slurm cluster on loopback for tests: munged + slurmctld + slurmd, started by hand.

    with LocalSlurm(workdir) as slurm:           # installs slurm-wlm through apt when missing (root)
        job_id = slurm.submit(["launch/slurm_pretrain.sbatch", ...], environment)
        state = slurm.wait(job_id, timeout=120)  # "COMPLETED", "FAILED", ...

Everything lives under `workdir` (config, keys, sockets, state, logs); nothing in /etc or /run is
touched. No systemd: each daemon runs in the foreground as our child process and is stopped by its
PID on exit. The node is called `localhost` (slurmd -N) so SLURM_JOB_NODELIST names a host that
resolves to 127.0.0.1 and every byte of the test stays on loopback. Facts this relies on are in
environment.md (section Slurm). Anything that prevents the cluster from starting raises
SlurmUnavailable with the reason; the test turns that into a visible skip or failure.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODE_NAME = "localhost"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here; the message says why."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure_installed() -> None:
    """`apt-get install slurm-wlm` when slurmctld is missing (root only, as in CI)."""
    if os.geteuid() != 0:
        # slurmd starts job steps as the submitting user, which needs root (CI runs as root).
        raise SlurmUnavailable("a local slurmd needs root; run as root (CI does)")
    if all(shutil.which(name) for name in ("slurmctld", "slurmd", "munged", "sbatch", "sacct")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurm-wlm is not installed and this is not a root apt machine to install it")
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm"]):
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
        if result.returncode != 0 and command[1] == "install":
            raise SlurmUnavailable(f"apt-get install slurm-wlm failed: {result.stderr.strip()[-400:]}")
    # apt may also have started daemons through init scripts in some images; we use our own.
    if not shutil.which("slurmctld"):
        raise SlurmUnavailable("apt-get install slurm-wlm finished but slurmctld is still missing")


SLURM_CONF = """\
ClusterName=cheemstest
SlurmctldHost={controller}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
# The main scheduling loop every second (default 60 s): a pending job whose begin time has passed (a
# requeued job the test releases with StartTime=now+5) starts then, not up to a minute later.
SchedulerParameters=sched_interval=1
JobRequeue=1
# a requeued job may start again at once (the default holds it back for a while)
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class LocalSlurm:
    def __init__(self, workdir: str | Path, cpus: int = 2):
        self.workdir = Path(workdir).resolve()
        self.cpus = cpus
        self.processes: dict[str, subprocess.Popen] = {}
        self.conf = self.workdir / "slurm.conf"

    # -- environment for the clients (sbatch, squeue, sacct, scontrol) -------------------------
    @property
    def environment(self) -> dict:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def command(self, arguments: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(arguments, capture_output=True, text=True, env=self.environment, timeout=timeout)

    # -- start / stop ---------------------------------------------------------------------------
    def __enter__(self) -> "LocalSlurm":
        ensure_installed()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _start(self) -> None:
        workdir = self.workdir
        for name in ("munge", "state", "spool"):
            (workdir / name).mkdir(parents=True, exist_ok=True)
        # munged refuses group/world-writable directories and keys readable by others.
        os.chmod(workdir / "munge", 0o700)
        key = workdir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        munge_socket = workdir / "munge" / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={munge_socket}",
                               f"--key-file={key}", f"--pid-file={workdir}/munge/munged.pid",
                               f"--log-file={workdir}/munge/munged.log", f"--seed-file={workdir}/munge/munged.seed"])
        self._wait_for(lambda: munge_socket.exists(), "munged socket", 20)

        self.conf.write_text(SLURM_CONF.format(
            controller=socket.gethostname().split(".")[0], controller_port=_free_port(), node_port=_free_port(),
            munge_socket=munge_socket, state=workdir / "state", spool=workdir / "spool", workdir=workdir,
            node=NODE_NAME, cpus=self.cpus))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", NODE_NAME])

        def node_idle() -> bool:
            result = self.command(["sinfo", "--noheader", "--format=%t", "--nodes", NODE_NAME])
            return result.returncode == 0 and result.stdout.strip() in ("idle", "mix", "alloc")
        self._wait_for(node_idle, "the Slurm node to become idle", 60)

    def _spawn(self, name: str, arguments: list[str]) -> None:
        log = open(self.workdir / f"{name}.console", "w")
        self.processes[name] = subprocess.Popen(arguments, stdout=log, stderr=subprocess.STDOUT,
                                                env=self.environment, start_new_session=True)
        log.close()

    def _wait_for(self, condition, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {process.returncode} while waiting for {what}: "
                                           f"{self.tail(name)}")
            if condition():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}: "
                               + " | ".join(f"{name}: {self.tail(name)}" for name in self.processes))

    def tail(self, name: str, characters: int = 600) -> str:
        texts = []
        for path in (self.workdir / f"{name}.console", self.workdir / f"{name}.log",
                     self.workdir / "munge" / f"{name}.log"):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-characters:])
        return " ".join(" ".join(texts).split())

    def stop(self) -> None:
        """Stop the daemons we started, by PID, newest first; escalate to SIGKILL after 10 s."""
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self.processes.clear()

    # -- jobs -----------------------------------------------------------------------------------
    def submit(self, arguments: list[str], environment: dict | None = None) -> str:
        result = subprocess.run(["sbatch", "--parsable", *arguments], capture_output=True, text=True,
                                env=dict(environment or self.environment, SLURM_CONF=str(self.conf)), timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job_field(self, job_id: str, field: str) -> str:
        """A field of `scontrol show job` (JobState, RestartCnt, ExitCode, ...); '' when unknown."""
        result = self.command(["scontrol", "show", "job", job_id])
        for token in result.stdout.split():
            key, _, value = token.partition("=")
            if key == field:
                return value
        return ""

    def wait(self, job_id: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {state or 'unknown'} after {timeout:.0f} s; "
                             f"slurmctld: {self.tail('slurmctld')}")
