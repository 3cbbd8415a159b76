"""Each cluster launcher in launch/, run for real with 2 CPU ranks on localhost, against torchrun.

    deepspeed --hostfile   launch/deepspeed_hostfile.sh (hostfile "localhost slots=2", no ssh)
    mpirun                 launch/mpirun.sh (Open MPI, loopback only, ranks through mpi4py)
    Slurm                  launch/slurm_submit.sh -> launch/slurm_pretrain.sbatch -> srun, on a real
                           munged/slurmctld/slurmd started on loopback (tests/integration/slurm_harness.py;
                           slurm-wlm is apt-installed when missing), plus preemption: `scontrol requeue`
                           mid-run -> SIGTERM -> checkpoint -> exit -> Slurm restarts the job -> resume.

Every run trains the same shrunken cheems-tiny (2 layers "SA", hidden 64, seq 64, ZeRO-1, fp32) on a
small stdlib-docstring corpus built here, for STEPS steps with global batch 4 (micro 2 x 2 ranks).
The oracle is a 2-rank `torchrun` run of the identical configuration: each launcher's per-step
train losses (metrics.jsonl) must equal it. "Both ranks trained" is checked from two independent
traces: each rank logs its own layout line (pretrain.distributed_env), and each rank writes its
own ZeRO optimizer shard into the final checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.slurm_harness import LocalSlurm, SlurmUnavailable

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
STEPS = 30
RANKS = 2
# Launcher and rank variables of the test runner's own environment must not leak into the launches.
LEAKING = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|SLURM_.*|OMPI_.*|"
                     r"PMI_.*|PMIX_.*|TORCHELASTIC_.*|GROUP_RANK|ROLE_.*)$")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_environment(**extra) -> dict:
    environment = {key: value for key, value in os.environ.items() if not LEAKING.match(key)}
    environment.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    environment.update(extra)
    return environment


# ----------------------------------------------------------------------------------------------
# Data and the torchrun oracle, built once for the module
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A 400 kB stdlib-docstring corpus, a 512-token sentencepiece model and its .bin/.idx shards."""
    from data_tools.corpus import write_stdlib_corpus
    from data_tools.preprocess import preprocess
    from data_tools.tokenizer import train_sentencepiece

    directory = tmp_path_factory.mktemp("launcher_data")
    corpus = directory / "corpus.jsonl"
    write_stdlib_corpus(str(corpus), max_bytes=400_000)
    lines = [line for document in corpus.read_text(encoding="utf-8").splitlines()
             for line in json.loads(document)["text"].splitlines() if line.strip()]
    train_sentencepiece(lines, str(directory / "tokenizer"), vocab_size=512)
    preprocess([str(corpus)], str(directory / "text_document"), str(directory / "tokenizer.model"), append_eod=True)
    return directory


def pretrain_arguments(data: Path, run_dir: Path, steps: int = STEPS) -> list[str]:
    overrides = {
        "data.blend": data / "text_document", "data.tokenizer_model": data / "tokenizer.model",
        "data.seq_length": 64, "data.cache_dir": data / "cache",
        "model.vocab_size": 512, "model.num_layers": 2, "model.layer_pattern": "SA", "model.hidden_size": 64,
        "model.num_experts": 64, "model.ssd_chunk_size": 32,
        "train.steps": steps, "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.zero_stage": 1,
        "train.precision": "fp32", "train.device": "cpu", "schedule.warmup_steps": 2,
        "eval.iterations": 0, "checkpoint.interval": 0, "checkpoint.save_at_exit": "true",
        "logging.interval": 1, "logging.tensorboard": "false", "logging.run_dir": run_dir,
    }
    arguments = ["--config", str(REPOSITORY / "configs" / "cheems-tiny.yaml")]
    for key, value in overrides.items():
        arguments += ["--set", f"{key}={value}"]
    return arguments


def run(command: list[str], environment: dict, timeout: float, what: str) -> str:
    started = time.monotonic()
    result = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{what} exited with {result.returncode}:\n{output[-4000:]}"
    print(f"{what}: {time.monotonic() - started:.1f} s")
    return output


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [record for record in records if record["kind"] == "train"]
    assert [record["step"] for record in train] == list(range(1, len(train) + 1)), "steps missing in metrics.jsonl"
    return [record["train/loss"] for record in train]


@pytest.fixture(scope="module")
def torchrun_losses(tiny_data, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "pretrain", *pretrain_arguments(tiny_data, run_dir)]
    output = run(command, clean_environment(), 300, "torchrun (oracle)")
    check_layout_lines(output, "torchrun")
    losses = train_losses(run_dir)
    assert len(losses) == STEPS and all(map(lambda loss: 0 < loss < 20, losses))
    return losses


# ----------------------------------------------------------------------------------------------
# Checks shared by the launchers
# ----------------------------------------------------------------------------------------------

LAYOUT_LINE = re.compile(r"ranks: rank (\d+) of (\d+) \| local (\d+) \| host \S+ \| master (\S+):(\d+) \| from (\w+)")


def check_layout_lines(output: str, source: str) -> list[tuple]:
    """Every rank printed where it sits; returns [(rank, world, local, addr, port), ...] sorted by rank."""
    found = sorted({(int(rank), int(world), int(local), addr, port, origin)
                    for rank, world, local, addr, port, origin in LAYOUT_LINE.findall(output)})
    assert [entry[0] for entry in found] == list(range(RANKS)), f"layout lines of ranks {found}, want 0..{RANKS - 1}"
    for rank, world, local, addr, port, origin in found:
        assert (world, local, origin) == (RANKS, rank, source), f"rank {rank}: {(world, local, origin)}"
    assert len({(addr, port) for *_, addr, port, _ in found}) == 1, f"ranks disagree on the master: {found}"
    return found


def check_every_rank_saved(run_dir: Path) -> None:
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert checkpoints, f"no checkpoint in {run_dir / 'checkpoints'}"
    final = checkpoints[-1]
    assert final.name == f"step_{STEPS:08d}", f"newest checkpoint is {final.name}, want step {STEPS}"
    for rank in range(RANKS):
        shards = list(final.rglob(f"*zero_pp_rank_{rank}_*optim_states.pt"))
        assert shards, f"rank {rank} wrote no ZeRO optimizer shard in {final}"


def check_same_losses(losses: list[float], oracle: list[float]) -> None:
    assert len(losses) == len(oracle)
    assert losses == pytest.approx(oracle, rel=1e-5, abs=0), "per-step losses differ from the torchrun run"


# ----------------------------------------------------------------------------------------------
# deepspeed --hostfile and mpirun
# ----------------------------------------------------------------------------------------------

def test_deepspeed_hostfile_two_slots(tiny_data, torchrun_losses, tmp_path):
    hostfile, run_dir = tmp_path / "hostfile", tmp_path / "run"
    hostfile.write_text("# the CI machine\nlocalhost slots=2\n")
    command = [str(REPOSITORY / "launch" / "deepspeed_hostfile.sh"), "--hostfile", str(hostfile),
               "--include", "localhost:0,1", "--master-port", str(free_port()), "--python", PYTHON,
               "--config", str(REPOSITORY / "configs" / "cheems-tiny.yaml"),
               "--", *pretrain_arguments(tiny_data, run_dir)[2:]]
    output = run(command, clean_environment(), 300, "deepspeed --hostfile")
    assert "deepspeed launch: hosts localhost | master 127.0.0.1" in output
    assert "dist_world_size=2" in output, "the ranks were not started by deepspeed's launcher"
    # deepspeed's launcher exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*: the "torchrun" source.
    layout = check_layout_lines(output, "torchrun")
    assert {addr for *_, addr, _, _ in layout} == {"127.0.0.1"}
    check_every_rank_saved(run_dir)
    check_same_losses(train_losses(run_dir), torchrun_losses)


def test_mpirun_two_ranks_on_loopback(tiny_data, torchrun_losses, tmp_path):
    if shutil.which("mpirun") is None:
        reason = "Open MPI's mpirun is not installed (make install apt-installs openmpi-bin)"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    run_dir = tmp_path / "run"
    command = [str(REPOSITORY / "launch" / "mpirun.sh"), "--np", str(RANKS), "--interface", "lo", "--oversubscribe",
               "--master-port", str(free_port()), "--python", PYTHON,
               "--config", str(REPOSITORY / "configs" / "cheems-tiny.yaml"),
               "--", *pretrain_arguments(tiny_data, run_dir)[2:]]
    output = run(command, clean_environment(), 300, "mpirun")
    # Ranks came from mpi4py (COMM_WORLD); all on one host, so the master is loopback.
    layout = check_layout_lines(output, "mpi")
    assert {addr for *_, addr, _, _ in layout} == {"127.0.0.1"}
    check_every_rank_saved(run_dir)
    check_same_losses(train_losses(run_dir), torchrun_losses)


# ----------------------------------------------------------------------------------------------
# Slurm
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    workdir = Path("/tmp") / f"cheems-slurm-{os.getpid()}"   # short: munge's socket path has a length limit
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        cluster = LocalSlurm(workdir).__enter__()
    except SlurmUnavailable as reason:
        if os.environ.get("CI"):
            pytest.fail(f"Slurm could not be started in CI: {reason}")
        pytest.skip(f"Slurm cannot run here: {reason}")
    yield cluster
    cluster.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def submit_pretrain(slurm: LocalSlurm, tiny_data: Path, run_dir: Path, log_dir: Path, job_name: str) -> str:
    command = [str(REPOSITORY / "launch" / "slurm_submit.sh"), "--nodes", "1", "--gpus-per-node", "0",
               "--tasks-per-node", str(RANKS), "--config", str(REPOSITORY / "configs" / "cheems-tiny.yaml"),
               "--job-name", job_name, "--log-dir", str(log_dir), "--python", PYTHON,
               "--", *pretrain_arguments(tiny_data, run_dir)[2:]]
    result = subprocess.run(command, cwd=REPOSITORY, env=clean_environment(SLURM_CONF=str(slurm.conf)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"slurm_submit.sh failed: {result.stdout}{result.stderr}"
    job_id = result.stdout.strip().splitlines()[-1].split(";")[0]
    assert job_id.isdigit(), f"slurm_submit.sh printed {result.stdout!r}"
    return job_id


def test_slurm_sbatch_two_tasks(slurm, tiny_data, torchrun_losses, tmp_path):
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    started = time.monotonic()
    job_id = submit_pretrain(slurm, tiny_data, run_dir, log_dir, "cheems-test")
    state = slurm.wait(job_id, timeout=240)
    log_path = log_dir / f"cheems-test-{job_id}.out"
    log = log_path.read_text() if log_path.exists() else f"(no log at {log_path})"
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-4000:]}"
    print(f"slurm job {job_id}: {time.monotonic() - started:.1f} s")

    assert "=== " in log and f"job {job_id} start 1 (restart count 0)" in log
    layout = check_layout_lines(log, "slurm")
    # MASTER_ADDR is the first host of SLURM_JOB_NODELIST (the node is called localhost), the port
    # derived from the job id.
    assert {(addr, port) for *_, addr, port, _ in layout} == {("localhost", str(10000 + int(job_id) % 50000))}
    assert "tasks exited with 0" in log
    check_every_rank_saved(run_dir)
    check_same_losses(train_losses(run_dir), torchrun_losses)


def logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue   # a line being written
    return steps


def wait_for_restart(slurm: LocalSlurm, job_id: str, log: Path, restarts: int, until: str, timeout: float = 300) -> str:
    """Wait until start number `restarts + 1` of the job has begun (its header is in the log) and the
    job is in state `until` or has ended. Returns the state."""
    deadline = time.monotonic() + timeout
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    header = f"job {job_id} start {restarts + 1} (restart count {restarts})"
    released = False
    while True:
        state, count = slurm.job_field(job_id, "JobState"), slurm.job_field(job_id, "Restarts")
        # Around a requeue the state passes through COMPLETING/REQUEUED with the new restart count
        # before the next start, so the log header is what says the new start has begun.
        started = log.exists() and header in log.read_text()
        if count == str(restarts) and started and (state == until or state in final):
            return state
        if not released and state == "PENDING" and slurm.job_field(job_id, "Reason") == "BeginTime":
            # slurmctld holds a requeued job back for 120 s (a fixed delay); start it in 5 s instead. Not at
            # once: slurmd still holds the revoked credential of the killed run for a moment, and a start
            # within it is killed ("Job credential revoked") and the job ends FAILED.
            slurm.command(["scontrol", "update", f"JobId={job_id}", "StartTime=now+5"])
            released = True
        assert time.monotonic() < deadline, f"job {job_id}: state {state}, restarts {count}, want {restarts}"
        time.sleep(0.3)


def wait_for_step_after(slurm: LocalSlurm, job_id: str, metrics: Path, step: int, timeout: float = 240) -> None:
    """Wait until a training step later than `step` is logged: every rank is in the loop, handler set."""
    deadline = time.monotonic() + timeout
    while not any(logged > step for logged in logged_steps(metrics)):
        state = slurm.job_field(job_id, "JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED"), \
            f"job {job_id} is {state} before a step after {step} was logged"
        assert time.monotonic() < deadline, f"job {job_id} logged no step after {step} in {timeout:.0f} s"
        time.sleep(0.05)


def test_slurm_preemption_and_time_limit_requeue_then_resume(slurm, tiny_data, torchrun_losses, tmp_path):
    """One job, stopped twice mid-run and restarted by Slurm each time; the whole curve equals the
    uninterrupted torchrun run.

    1. preemption: `scontrol requeue` -> Slurm sends SIGTERM to every task (and the batch shell) ->
       the tasks save a checkpoint and exit -> Slurm requeues the job (--requeue).
    2. time limit: USR1 to the batch shell, as `--signal=B:USR1@300` does before the limit ->
       the script forwards SIGTERM -> checkpoint -> the script requeues its own job.
    Each restart runs with `--resume auto` and continues from the checkpoint just written.
    """
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    metrics = run_dir / "metrics.jsonl"
    job_id = submit_pretrain(slurm, tiny_data, run_dir, log_dir, "cheems-requeue")
    log_path = log_dir / f"cheems-requeue-{job_id}.out"

    wait_for_step_after(slurm, job_id, metrics, 0)
    requeue = slurm.command(["scontrol", "requeue", job_id])
    assert requeue.returncode == 0, requeue.stderr
    wait_for_restart(slurm, job_id, log_path, 1, until="RUNNING")
    first_stop = max(logged_steps(metrics) or [0])

    wait_for_step_after(slurm, job_id, metrics, first_stop)
    warning = slurm.command(["scancel", "--batch", "--signal=USR1", job_id])
    assert warning.returncode == 0, warning.stderr
    state = wait_for_restart(slurm, job_id, log_path, 2, until="COMPLETED")
    log = log_path.read_text()
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{log[-4000:]}"

    stops = [int(step) for step in re.findall(r"stopped by SIGTERM at step (\d+)", log)]
    resumes = [(int(saved), int(step)) for saved, step in re.findall(r"resumed from \S+step_(\d+) at step (\d+)", log)]
    # Rank 0 logs every stop and resume (other ranks may too): two distinct stops, mid-run.
    distinct_stops = sorted(set(stops))
    assert len(distinct_stops) == 2 and 1 <= distinct_stops[0] < distinct_stops[1] < STEPS, \
        f"want two stops mid-run, got {stops}:\n{log[-4000:]}"
    assert sorted(set(resumes)) == [(step, step) for step in distinct_stops], f"resumes {resumes}, stops {stops}"
    assert "got SIGTERM" in log and "got SIGUSR1" in log and f"requeued job {job_id}" in log
    for start in (1, 2, 3):
        assert f"job {job_id} start {start} (restart count {start - 1})" in log
    check_every_rank_saved(run_dir)
    check_same_losses(train_losses(run_dir), torchrun_losses)
