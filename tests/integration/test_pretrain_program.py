"""The whole `python -m pretrain` program, launched as users launch it (python -m / torchrun, gloo on CPU).

Data: a tokenizer and a shard built here from the standard library's docstrings (every machine has
them). Model: cheems-tiny shrunk further by --set (hidden 64, 2 layers "SA", 64 CDMoE experts,
vocab 512, sequence 64) so one launch takes seconds. Losses are read back from each run's
metrics.jsonl (logged every step); the single-process fp32 run is the reference every layout must
match: ZeRO 0-3 with two data-parallel ranks, tensor parallel 2, resume, preemption, crashes.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import checkpoint_problem, newest_valid_checkpoint

pytestmark = pytest.mark.slow

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.vocab_size=512", "model.hidden_size=64", "model.num_layers=2", "model.layer_pattern=SA",
    "model.num_heads=4", "model.intermediate_size=128", "model.ssd_chunk_size=32", "model.num_experts=64",
    "model.expert_retrieval_heads=2", "model.experts_per_head=4", "model.expert_retrieval_dim=16",
    "data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=8", "train.precision=fp32",
    "train.zero_stage=0", "schedule.warmup_steps=3", "optimizer.lr=0.003", "logging.interval=1",
    "logging.tensorboard=false", "eval.interval=0", "eval.iterations=0", "checkpoint.interval=0",
    "checkpoint.save_at_exit=false",
]
STEPS = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment() -> dict:
    """The test process's environment without launcher variables: earlier tests in this pytest process
    may have set MASTER_PORT & co. for their own process group (whose port is still bound)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE"):
        env.pop(name, None)
    return env


def pretrain_command(data: dict, run_dir: Path, ranks: int, extra: list[str]) -> list[str]:
    if ranks == 1:
        command = [sys.executable, "-m", "pretrain"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                   f"--master_port={free_port()}", "-m", "pretrain"]
    command += ["--config", "configs/cheems-tiny.yaml"]
    for override in TINY + [f"data.blend={data['prefix']}", f"data.tokenizer_model={data['tokenizer']}",
                            f"logging.run_dir={run_dir}", f"train.steps={STEPS}"] + extra:
        command += ["--set", override]
    return command


def run_pretrain(data: dict, run_dir: Path, ranks: int = 1, extra: list[str] = (), expect: int = 0):
    completed = subprocess.run(pretrain_command(data, run_dir, ranks, list(extra)), cwd=REPOSITORY_ROOT,
                               env=environment(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == expect, completed.stderr[-4000:]
    return completed


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


def losses(run_dir: Path) -> list[float]:
    return [record["train/loss"] for record in train_records(run_dir)]


def assert_close(actual: list[float], expected: list[float], relative: float) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a - e) <= relative * abs(e), f"step {step}: {a} vs {e}"


# `data` (the shard and tokenizer), `reference_run` (the one-process run every layout must match) and `reference`
# (its losses) are in tests/integration/conftest.py, built once per session: test_export.py exports its checkpoint.


ZERO2_EXTRA = ["train.zero_stage=2", "checkpoint.interval=2"]


@pytest.fixture(scope="module")
def zero2_run(data) -> Path:
    """DP=2 under ZeRO-2 for all the steps, a checkpoint every 2: the ZeRO-2 layout check and the uninterrupted run
    the bitwise-resume test compares with (one run for both: each 2-rank run costs ~16 s of the suite)."""
    run_dir = data["dir"] / "zero2"
    run_pretrain(data, run_dir, ranks=2, extra=ZERO2_EXTRA)
    return run_dir


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_zero_stage_with_two_data_parallel_ranks_matches_one_process(data, reference, reference_run, zero_stage,
                                                                    request):
    if zero_stage == 2:
        run_dir = request.getfixturevalue("zero2_run")
    else:
        run_dir = data["dir"] / f"zero{zero_stage}"
        # ZeRO-3 also runs with activation checkpointing: recomputation must not change the numbers.
        extra = [f"train.zero_stage={zero_stage}"]
        if zero_stage == 3:
            extra += ["train.activation_checkpointing=true", "checkpoint.save_at_exit=true"]
        run_pretrain(data, run_dir, ranks=2, extra=extra)
    assert_close(losses(run_dir), reference, relative=1e-5)
    if zero_stage == 3:
        # The weights consolidated from ZeRO-3 partitions (pretrain.generate's loader, DeepSpeed's
        # zero_to_fp32) equal the one-process run's weights after the same 10 steps.
        from pretrain.generate import load_model_from_checkpoint
        partitioned, _ = load_model_from_checkpoint(newest_valid_checkpoint(run_dir / "checkpoints"))
        single, _ = load_model_from_checkpoint(newest_valid_checkpoint(reference_run / "checkpoints"))
        single_weights = dict(single.named_parameters())
        for name, weight in partitioned.named_parameters():
            torch.testing.assert_close(weight, single_weights[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def tp2_run(data) -> Path:
    """TP=2 under ZeRO-1 for all the steps, a checkpoint halfway: the TP=2 layout check and the checkpoint of step
    N the universal-checkpoint test reshards (one run for both: each 2-rank run costs ~16 s of the suite)."""
    run_dir = data["dir"] / "tp2"
    run_pretrain(data, run_dir, ranks=2, extra=["parallel.tensor_parallel_size=2", "train.zero_stage=1",
                                                f"checkpoint.interval={STEPS // 2}"])
    return run_dir


def test_tensor_parallel_two_matches_one_process(reference, tp2_run):
    records = train_records(tp2_run)
    assert_close([record["train/loss"] for record in records], reference, relative=1e-5)


def test_pipeline_parallel_two_stages_matches_one_process(data, reference):
    run_dir = data["dir"] / "pp2"
    run_pretrain(data, run_dir, ranks=2, extra=["parallel.pipeline_parallel_size=2", "train.zero_stage=1"])
    assert_close(losses(run_dir), reference, relative=1e-5)


def test_resume_reproduces_the_uninterrupted_run_bitwise(data, zero2_run):
    """2N steps straight vs N steps, exit, resume to 2N: identical losses and grad norms (ZeRO-2, DP=2)."""
    extra = ZERO2_EXTRA
    straight, resumed = zero2_run, data["dir"] / "resumed"
    run_pretrain(data, resumed, ranks=2, extra=extra + [f"train.exit_at_step={STEPS // 2}"])
    assert [record["step"] for record in train_records(resumed)] == list(range(1, STEPS // 2 + 1))
    completed = run_pretrain(data, resumed, ranks=2, extra=extra + ["checkpoint.resume=auto"])
    assert f"step_{STEPS // 2:08d} at step {STEPS // 2}" in completed.stderr
    expected, actual = train_records(straight), train_records(resumed)
    assert [r["step"] for r in actual] == list(range(1, STEPS + 1))
    assert [r["train/loss"] for r in actual] == [r["train/loss"] for r in expected]
    assert [r["train/grad_norm"] for r in actual] == [r["train/grad_norm"] for r in expected]
    assert [r["train/lr"] for r in actual] == [r["train/lr"] for r in expected]

    # The saved checkpoint samples text through the model's generate() (python -m pretrain.generate).
    final = newest_valid_checkpoint(resumed / "checkpoints")
    sampled = subprocess.run([sys.executable, "-m", "pretrain.generate", "--checkpoint", str(final), "--prompt",
                              "Return the", "--max-new-tokens", "8", "--temperature", "0"], cwd=REPOSITORY_ROOT,
                             env=environment(), capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.startswith("'Return the' -> 'Return the")


def test_resume_on_another_layout_through_a_universal_checkpoint(data, reference, reference_run, tp2_run):
    """TP=2 (ZeRO-1) to step N -> python -m pretrain.reshard -> DP=2 (ZeRO-2) to step 2N: the same losses as
    the one-process run, and the universal weights equal its weights at step N. Resuming the original
    checkpoint on the new layout is refused in one line."""
    resumed = data["dir"] / "dp2_from_universal"
    checkpoint = tp2_run / "checkpoints" / f"step_{STEPS // 2:08d}"
    assert checkpoint_problem(checkpoint) is None

    refused = run_pretrain(data, data["dir"] / "refused", ranks=1, expect=2,
                           extra=["train.zero_stage=1", f"checkpoint.resume={checkpoint}"])
    last_line = refused.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: checkpoint.resume: ") and "tensor_parallel=2" in last_line, refused.stderr
    assert "python -m pretrain.reshard" in last_line and "Traceback" not in refused.stderr

    universal_dir = data["dir"] / "universal"
    command = [sys.executable, "-m", "pretrain.reshard", str(checkpoint), str(universal_dir)]
    converted = subprocess.run(command, cwd=REPOSITORY_ROOT, env=environment(), capture_output=True, text=True,
                               timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    universal = universal_dir / checkpoint.name
    assert checkpoint_problem(universal) is None and json.loads((universal / "meta.json").read_text())["universal"]
    again = subprocess.run(command, cwd=REPOSITORY_ROOT, env=environment(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr

    # The universal weights are the whole parameters: equal to a one-process run's after the same steps
    # (this checks the recorded TP split: row-parallel joined along dim 1, replicated taken whole).
    from pretrain.generate import load_model_from_checkpoint
    joined, _ = load_model_from_checkpoint(universal)
    one_process, _ = load_model_from_checkpoint(reference_run / "checkpoints" / checkpoint.name)
    one_process_weights = dict(one_process.named_parameters())
    for name, weight in joined.named_parameters():  # TP=2 and one process round differently: ~1e-5 apart
        expected = one_process_weights[name]
        assert weight.shape == expected.shape, name
        assert ((weight - expected).norm() / expected.norm()).item() < 1e-4, name
    exported = subprocess.run([sys.executable, "-m", "pretrain.export", "--checkpoint", str(universal), "--output",
                               str(data["dir"] / "exported_universal")], cwd=REPOSITORY_ROOT, env=environment(),
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0 and (data["dir"] / "exported_universal" / "model.safetensors").is_file(), \
        exported.stderr[-2000:]

    other_model = run_pretrain(data, data["dir"] / "other_model", ranks=1, expect=2,
                               extra=["model.hidden_size=96", f"checkpoint.resume={universal}"])
    assert other_model.stderr.strip().splitlines()[-1].startswith(
        f"error: checkpoint.resume: {universal} was saved with model.hidden_size=64 (this run: 96)")

    run_pretrain(data, resumed, ranks=2, extra=["train.zero_stage=2", f"checkpoint.resume={universal}"])
    records = train_records(resumed)
    assert [record["step"] for record in records] == list(range(STEPS // 2 + 1, STEPS + 1))
    assert_close([record["train/loss"] for record in records], reference[STEPS // 2:], relative=1e-5)


def _wait_for(predicate, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def _worker_pids(launcher_pid: int) -> list[int]:
    output = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout
    return [int(pid) for pid in output.split()]


def test_sigterm_saves_and_kill_during_save_keeps_the_previous_checkpoint(data):
    run_dir = data["dir"] / "preempted"
    checkpoints = run_dir / "checkpoints"
    # bf16 here (the parity tests are fp32): DeepSpeed's bf16 optimizer states go through save and load too.
    long_run = ["train.steps=500", "train.zero_stage=1", "train.precision=bf16", "schedule.warmup_steps=3"]

    # (d) SIGTERM to every rank (what Slurm sends on preemption) mid-run: a checkpoint, exit 128 + 15.
    process = subprocess.Popen(pretrain_command(data, run_dir, 2, long_run), cwd=REPOSITORY_ROOT,
                               env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, 120, process)
    for pid in _worker_pids(process.pid):
        os.kill(pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "stopped by SIGTERM" in stderr, stderr[-3000:]
    saved = newest_valid_checkpoint(checkpoints)
    assert saved is not None and checkpoint_problem(saved) is None
    stopped_at = int(saved.name.split("_")[1])
    assert stopped_at >= 2

    # (e) kill -9 while the next checkpoint is being written (paused just before its rename).
    process = subprocess.Popen(
        pretrain_command(data, run_dir, 2, long_run + ["checkpoint.resume=auto", "checkpoint.interval=1",
                                                       "debug.pause_in_save_seconds=120"]),
        cwd=REPOSITORY_ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    in_progress = checkpoints / f"step_{stopped_at + 1:08d}.tmp"
    _wait_for(lambda: in_progress.is_dir() and any(in_progress.glob("rng_rank00001.pt")), 120, process)
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert in_progress.is_dir()                       # the torn save is there, under its temporary name
    assert not (checkpoints / f"step_{stopped_at + 1:08d}").exists()
    assert (checkpoints / "latest").read_text() == saved.name
    assert newest_valid_checkpoint(checkpoints) == saved

    # The previous checkpoint loads: resume auto picks it and trains on.
    completed = run_pretrain(data, run_dir, ranks=2, extra=long_run + [
        "checkpoint.resume=auto", f"train.exit_at_step={stopped_at + 1}"])
    assert f"resumed from {saved}" in completed.stderr
    assert newest_valid_checkpoint(checkpoints).name == f"step_{stopped_at + 1:08d}"
    assert not in_progress.exists()                   # cleaned up by the next completed save


def test_nonfinite_losses_are_skipped_and_too_many_in_a_row_stop_the_run(data):
    run_dir = data["dir"] / "nonfinite"
    completed = run_pretrain(data, run_dir, extra=[
        "debug.nonfinite_loss_at_steps=[2,4,5]", "train.max_consecutive_nonfinite=2", "checkpoint.interval=1"],
        expect=3)
    records = {record["step"]: record for record in train_records(run_dir)}
    assert records[2]["train/skipped_steps"] == 1 and records[3]["train/skipped_steps"] == 1
    assert records[5]["train/skipped_steps"] == 3 and 6 not in records
    assert "last good checkpoint" in completed.stderr and "step_00000004" in completed.stderr



@pytest.mark.parametrize("layout", [["train.precision=fp32", "train.zero_stage=0"],
                                    ["train.precision=bf16", "train.zero_stage=1"]], ids=["fp32-zero0", "bf16-zero1"])
def test_nonfinite_gradients_under_a_finite_loss_skip_the_update(data, layout):
    """NaN gradients with a finite loss: the step is skipped and the weights stay usable. bf16 ZeRO-1 runs
    with DeepSpeed's per-tensor overflow check off (pretrain.config.uses_norm_guard): there GuardedAdamW's
    guard on DeepSpeed's global grad norm is what stops the NaN update (without it step 3's loss is NaN)."""
    run_dir = data["dir"] / ("nonfinite_grad_" + layout[0].split("=")[1])
    run_pretrain(data, run_dir, extra=layout + ["debug.nonfinite_grad_at_steps=[2]", "train.steps=5"])
    records = {record["step"]: record for record in train_records(run_dir)}
    assert math.isfinite(records[2]["train/loss"]) and not math.isfinite(records[2]["train/grad_norm"])
    assert records[1]["train/skipped_steps"] == 0 and records[2]["train/skipped_steps"] == 1
    assert records[3]["train/lr"] == records[2]["train/lr"] > records[1]["train/lr"]  # warm-up held for the skip
    assert all(math.isfinite(records[step]["train/loss"]) for step in (3, 4, 5))
    assert records[5]["train/skipped_steps"] == 1 and math.isfinite(records[5]["train/grad_norm"])


CONFIG_ERRORS = {
    "zero3_with_pipeline": (["train.zero_stage=3", "parallel.pipeline_parallel_size=2"], "cannot combine with parallel.pipeline_parallel_size"),
    "global_batch_not_divisible": (["train.global_batch_size=7"], "train.global_batch_size=7 is not divisible"),
    "unknown_key": (["train.learning_rate=1"], "unknown key 'train.learning_rate'"),
    "missing_data": (["data.blend=/nonexistent/shard"], "/nonexistent/shard.bin does not exist"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_are_one_line_and_exit_2(data, tmp_path, case):
    overrides, message = CONFIG_ERRORS[case]
    completed = subprocess.run(pretrain_command(data, tmp_path / "run", 1, overrides), cwd=REPOSITORY_ROOT,
                               env=environment(), capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: configs/cheems-tiny.yaml: "), completed.stderr
    assert message in lines[0]
    assert not (tmp_path / "run").exists()           # nothing written before validation passed


def test_profile_script_attributes_a_step_to_its_phases(data, tmp_path):
    """bench/profile_pretrain.py (the tool behind the README's trainer-overhead numbers) runs the real
    trainer loop and splits each profiled step into phases whose host times fit inside the step.
    cheems-tiny cut to its two layer kinds ("SA", as TINY above): every phase and op kind is still profiled,
    and torch.profiler's event parsing (most of this test's time, ~proportional to the op count) is ~3x shorter."""
    out = tmp_path / "profile.json"
    completed = subprocess.run(
        [sys.executable, "bench/profile_pretrain.py", "--model", "cheems-tiny", "--data-prefix", data["prefix"],
         "--tokenizer", data["tokenizer"], "--seq-length", "64", "--micro-batch", "2", "--skip-steps", "1",
         "--profile-steps", "2", "--set", "model.num_layers=2", "--set", "model.layer_pattern=SA", "--out", str(out)],
        cwd=REPOSITORY_ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads(out.read_text())
    phases = summary["phases"]
    for name in ("forward", "backward", "engine_step"):
        assert phases[name]["ops"] > 0 and phases[name]["host_ms"] > 0, (name, phases.get(name))
    assert 0 < sum(phase.get("host_ms", 0.0) for phase in phases.values()) <= summary["step_wall_ms"] * 1.02
    assert "engine_step" in completed.stdout and "launches/step" in completed.stdout
