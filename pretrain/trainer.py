"""The training program: process groups -> model -> DeepSpeed engine -> loop (train, eval, log, save).

One iteration ("step") = gradient_accumulation_steps micro-batches of (micro_batch_size, seq_length)
tokens on every data-parallel rank, then one optimizer update: global_batch_size x seq_length tokens.
Steps are counted from 1; "step N" is the state after N updates, and the checkpoint of step N
resumes at step N + 1 with the data position `consumed_samples = N x global_batch_size`.

Guards:
  * non-finite loss (any rank, any micro-batch) or grad norm: the update is skipped, counted and
    logged; `train.max_consecutive_nonfinite` in a row stop the run (exit code 3) naming the last
    good checkpoint.
  * SIGTERM / SIGINT (Slurm preemption, Ctrl-C): the flag is agreed by all ranks at the end of the
    step, a checkpoint is saved, and the run exits with 128 + signal number.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import random
import signal
import socket
import time
from pathlib import Path

import numpy as np
import torch

from cheems_parallel.config import ConfigError

from .checkpoint import CheckpointError, CheckpointManager, read_meta, resume_problem, universal_checkpoint_info
from .config import BatchLayout, PretrainConfig, deepspeed_config_dict, uses_norm_guard
from .data import build_loader, build_run_data, to_model_inputs
from .distributed_env import discover_ranks
from .garbage import ScheduledGarbageCollection
from .metrics import MetricsLogger, peak_flops_per_device, peak_memory_gib, train_console_line
from .optimizer import GuardedAdamW, parameter_groups
from .schedule import build_scheduler

logger = logging.getLogger(__name__)

EXIT_NONFINITE = 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launched_alone() -> bool:
    names = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    return not any(name in os.environ for name in names)


def init_distributed(device: torch.device) -> None:
    """torch.distributed through DeepSpeed; a plain `python -m pretrain` becomes a world of one."""
    import deepspeed

    if _launched_alone():
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device.type == "cpu":
        # DeepSpeed JIT-builds a shared-memory all-reduce op for CPU on its first init (~50 s on two
        # cores); gloo alone is fast enough for the tiny CPU runs, so skip the build.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def pick_device(config: PretrainConfig) -> torch.device:
    wanted = config.train.device
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopSignal:
    """Remembers SIGTERM/SIGINT; the loop acts on it at a step boundary, on every rank together. Before the
    loop is armed (setup: process groups, model, dataset indices) there is nothing to save, so the signal
    ends the process at once with 128 + its number instead of waiting for a step that may never come."""

    def __init__(self):
        self.received = 0
        self.armed = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if not self.armed:
            logging.getLogger(__name__).warning("received %s during setup; stopping (nothing to save yet)",
                                                signal.Signals(signum).name)
            raise SystemExit(128 + int(signum))
        if not self.received:
            logging.getLogger(__name__).warning("received %s; saving a checkpoint at the end of this step",
                                                signal.Signals(signum).name)
        self.received = signum


class Trainer:
    def __init__(self, config: PretrainConfig, batch: BatchLayout):
        self.config = config
        self.batch = batch
        self.device = pick_device(config)
        self.stop = StopSignal()

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed
        import torch.distributed as dist
        from megatron.core import parallel_state

        from cheems_parallel.flops import flops_per_token
        from cheems_parallel.model import CheemsForCausalLM
        from cheems_parallel.parallel import DeepSpeedMPU, initialize_parallel

        config, batch = self.config, self.batch
        init_distributed(self.device)
        if dist.get_world_size() != batch.world_size:
            raise ConfigError(f"environment: the configuration was validated for world size {batch.world_size}, but "
                              f"the launch has {dist.get_world_size()} ranks; check the launcher's task count")
        self.rank = dist.get_rank()
        initialize_parallel(config.parallel)
        self.data_parallel_rank = parallel_state.get_data_parallel_rank()
        self.data_parallel_group = parallel_state.get_data_parallel_group()

        # Same seed on every rank: weights are initialised on the CPU from the full master weight, so
        # every layout starts from the numbers one process would have.
        seed_everything(config.train.seed)
        self.pipeline = config.parallel.pipeline_parallel_size > 1
        mpu = DeepSpeedMPU()
        # With ZeRO-0 in fp32 DeepSpeed steps our optimizer directly, so it clips (see optimizer.py); a
        # pipeline's norm spans every stage, which only the engine (through its pipeline grid) knows.
        clip_in_engine = self.pipeline or config.train.zero_stage > 0 or config.train.precision == "bf16"

        def make_optimizer(model):
            self.base_optimizer = GuardedAdamW(
                parameter_groups(model, config.optimizer.weight_decay), lr=config.optimizer.lr,
                betas=tuple(config.optimizer.betas), eps=config.optimizer.eps, mpu=mpu,
                clip_max_norm=None if clip_in_engine else config.train.gradient_clipping,
                fused=self.device.type == "cuda")
            return self.base_optimizer

        scheduler = lambda wrapped: build_scheduler(wrapped, config.train.steps, config.schedule, config.optimizer)  # noqa: E731
        ds_config = deepspeed_config_dict(config, batch, clip_in_engine)

        # The checkpoint to resume from is found and checked against this layout before anything is built.
        self.layout = {"world_size": batch.world_size, "data_parallel": batch.data_parallel_size,
                       "tensor_parallel": config.parallel.tensor_parallel_size,
                       "pipeline_parallel": config.parallel.pipeline_parallel_size,
                       "zero_stage": config.train.zero_stage}
        self.checkpoints = CheckpointManager(config.checkpoint.dir, config.checkpoint.keep_last,
                                             config.debug.pause_in_save_seconds)
        resume_path = self.checkpoints.resolve(config.checkpoint.resume)
        if resume_path is not None:
            resume_meta = read_meta(resume_path)
            problem = resume_problem(resume_path, resume_meta, self.layout, config.to_dict()["model"])
            if problem:
                raise CheckpointError(f"checkpoint.resume: {problem}")
            if resume_meta.get("universal"):  # pretrain.reshard's output: whole parameters, sliced on load
                ds_config.setdefault("checkpoint", {})["load_universal"] = True
        if self.pipeline:
            from .pipeline import build_pipeline_engine
            self.engine, self.scheduler = build_pipeline_engine(config, make_optimizer, scheduler, ds_config)
            model = self.engine.module
        else:
            # Weights come from per-component seeds (init_seed), identical in every TP/PP/DP layout.
            model = CheemsForCausalLM(config.model, config.parallel, init_seed=config.train.seed)
            model.set_activation_checkpointing(config.train.activation_checkpointing)
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=make_optimizer(model), lr_scheduler=scheduler, config=ds_config, mpu=mpu,
                dist_init_required=False)
            # ZeRO-1/2 bf16 with DeepSpeed's per-tensor check off (the default there, pretrain/config.py):
            # the non-finite guard reads the global grad norm DeepSpeed computes.
            if uses_norm_guard(config, ds_config) and ds_config["bf16"]["check_grad_overflow"] is False:
                zero_optimizer = self.engine.optimizer
                self.base_optimizer.norm_guard = lambda: getattr(zero_optimizer, "_global_grad_norm", None)
                self.base_optimizer.overflow_target = zero_optimizer
        uses_kernels = self.device.type == "cuda" and any(getattr(module, "use_kernels", False) for module in model.modules())
        self.kernel_path = "triton kernels" if uses_kernels else "pytorch reference ops"

        # How each parameter is split over TP ranks, saved with every checkpoint for pretrain.reshard.
        self.universal_info = universal_checkpoint_info(self.engine.module)
        self.step = 0
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.last_saved: Path | None = None
        if resume_path is not None:
            state = self.checkpoints.load(self.engine, resume_path, self.layout)
            self.step = int(state["step"])
            self.consumed_samples = int(state["consumed_samples"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.last_saved = resume_path
            logger.info("resumed from %s at step %d (%d samples consumed)", resume_path, self.step,
                        self.consumed_samples)

        self.data = build_run_data(config, batch)
        self.metrics = MetricsLogger(config.logging.run_dir, enabled=self.rank == 0,
                                     tensorboard=config.logging.tensorboard,
                                     resumed_step=self.step if resume_path is not None else None)
        self.flops_per_token = flops_per_token(config.model, config.data.seq_length)
        self.peak_flops = peak_flops_per_device(config.logging.peak_flops_per_device, config.train.precision)
        if self.rank == 0:
            from cheems_parallel.flops import parameter_counts
            counts = parameter_counts(config.model)
            logger.info("model: %.2fM parameters (%.2fM active), %.1f MFLOP per token (training) | layout %s | "
                        "global batch %d x %d tokens (micro %d, accumulation %d) | device %s | %s",
                        counts["total"] / 1e6, counts["active"] / 1e6, self.flops_per_token / 1e6, self.layout,
                        batch.global_batch_size, config.data.seq_length, batch.micro_batch_size,
                        batch.gradient_accumulation_steps, self.device, self.kernel_path)

    # -- helpers --------------------------------------------------------------------------------
    def _all_reduce_mean(self, values: torch.Tensor, group=None) -> torch.Tensor:
        import torch.distributed as dist
        values = values.to(self.device)
        dist.all_reduce(values, group=group or self.data_parallel_group)
        size = dist.get_world_size(group=group or self.data_parallel_group)
        return values / size

    def _any_rank(self, flag: bool) -> bool:
        import torch.distributed as dist
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def save(self) -> Path:
        client_state = {"step": self.step, "consumed_samples": self.consumed_samples,
                        "skipped_steps": self.skipped_steps, "config": self.config.to_dict(),
                        "universal_checkpoint_info": self.universal_info}
        path = self.checkpoints.save(self.engine, self.step, client_state, self.layout)
        self.last_saved = path
        if self.rank == 0:
            logger.info("saved checkpoint %s", path)
        return path

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.data.valid_dataset is None or self.config.eval.iterations == 0:
            return {}
        self.engine.eval()
        loader = build_loader(self.data.valid_dataset, 0, self.batch, self.data_parallel_rank, 0,
                              self.config.model.vocab_size)
        total, count = torch.zeros(1, dtype=torch.float64), 0
        if self.pipeline:  # eval_batch runs gradient_accumulation_steps micro-batches through the stages
            from .pipeline import pipeline_micro_batches
            batches = pipeline_micro_batches(iter(loader), self.device)
            rounds = max(1, self.config.eval.iterations // self.batch.gradient_accumulation_steps)
            for _ in range(rounds):
                total += self.engine.eval_batch(batches).detach().double().cpu()
                count += 1
        for index, micro_batch in enumerate([] if self.pipeline else loader):
            if index >= self.config.eval.iterations:
                break
            out = self.engine(**to_model_inputs(micro_batch, self.device))
            total += out.loss.detach().double().cpu()
            count += 1
        self.engine.train()
        loss = float(self._all_reduce_mean(total / max(count, 1)).item())
        values = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
        self.metrics.write(self.step, values, kind="eval")
        self.metrics.console(f"eval at step {self.step} | loss {loss:.4f} | perplexity {values['eval/perplexity']:.2f}")
        return values

    def _log_step(self, interval_losses: list, usage: dict, step_lr: float, grad_norm: float | None,
                  interval_seconds: float, interval_steps: int, average_step_seconds: float) -> None:
        """metrics.jsonl + TensorBoard + the console line (rank 0). The loss is the mean over the steps of
        the interval (skipped, non-finite ones left out) and over data-parallel ranks; expert usage and
        the grad norm are the last step's."""
        batch, config = self.batch, self.config
        step_losses = self._all_reduce_mean(torch.stack(interval_losses))
        finite = step_losses[torch.isfinite(step_losses)]
        mean_loss = float(finite.mean().item()) if len(finite) else float("nan")
        usage_values = {}
        if usage:  # CDMoE expert usage, per layer
            keys = sorted(usage)
            averaged = self._all_reduce_mean(torch.stack([usage[key] for key in keys])
                                             / batch.gradient_accumulation_steps)
            usage_values = dict(zip(keys, averaged.tolist()))
        tokens_per_second = interval_steps * batch.global_batch_size * config.data.seq_length / interval_seconds
        values = {
            "train/loss": mean_loss,
            "train/lr": step_lr,
            "train/grad_norm": grad_norm,
            "train/skipped_steps": self.skipped_steps,
            "train/consumed_samples": self.consumed_samples,
            "perf/tokens_per_second": tokens_per_second,
            "perf/mfu": (tokens_per_second * self.flops_per_token / (self.peak_flops * batch.world_size)
                         if self.peak_flops else None),
            "perf/peak_memory_gib": peak_memory_gib(self.device),
            "perf/seconds_per_step": interval_seconds / interval_steps,
        }
        values.update(usage_values)
        self.metrics.write(self.step, values)
        self.metrics.console(train_console_line(self.step, config.train.steps, values, average_step_seconds))

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> int:
        self.stop.armed = True
        with ScheduledGarbageCollection(self.config.train.gc_interval) as collector:
            return self._train_loop(collector)

    def _train_loop(self, collector: ScheduledGarbageCollection) -> int:
        config, batch, engine = self.config, self.batch, self.engine
        total_steps = config.train.steps
        nonfinite_steps = set(config.debug.nonfinite_loss_at_steps)
        nonfinite_grad_steps = set(config.debug.nonfinite_grad_at_steps)
        if self.step < total_steps:
            iterator = iter(build_loader(self.data.train_dataset, self.consumed_samples, batch,
                                         self.data_parallel_rank, config.data.num_workers, config.model.vocab_size))
            if self.pipeline:
                from .pipeline import pipeline_micro_batches
                iterator = pipeline_micro_batches(iterator, self.device)
        consecutive_bad = 0
        # Throughput counts the training steps only (evaluation and saves excluded).
        interval_seconds, interval_steps, interval_losses = 0.0, 0, []
        run_start_step, run_train_seconds = self.step, 0.0
        exit_code = 0
        engine.train()
        while self.step < total_steps:
            step_number = self.step + 1
            step_start = time.perf_counter()
            step_lr = self.scheduler.get_last_lr()[0]   # the rate this update uses
            losses, usage, loss_bad = [], {}, False
            if self.pipeline:  # forward, backward and the update of the whole global batch in one call
                losses.append(engine.train_batch(iterator).detach().float())
            for _ in range(0 if self.pipeline else batch.gradient_accumulation_steps):
                out = engine(**to_model_inputs(next(iterator), self.device))
                loss = out.loss
                if step_number in nonfinite_steps:
                    loss = loss * float("nan")
                if step_number in nonfinite_grad_steps:
                    loss = _NaNGradient.apply(loss)
                engine.backward(loss)
                losses.append(loss.detach().float())
                for key, value in out.metrics.items():
                    usage[key] = usage.get(key, 0.0) + value.detach().float()
                if engine.is_gradient_accumulation_boundary():
                    loss_bad = self._any_rank(not bool(torch.isfinite(torch.stack(losses)).all()))
                    self.base_optimizer.skip_next = loss_bad
                engine.step()
            self.base_optimizer.skip_next = False  # DeepSpeed may have skipped without calling us
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else None
            skipped = loss_bad or not engine.was_step_applied() or (grad_norm is not None and not math.isfinite(grad_norm))
            self.step = step_number
            self.consumed_samples += batch.global_batch_size
            collector.after_step(self.step)  # inside the timed step: its cost shows in tokens/s
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # step time = device time too, not just the launches
            step_seconds = time.perf_counter() - step_start
            interval_seconds += step_seconds
            run_train_seconds += step_seconds
            interval_steps += 1
            interval_losses.append(torch.stack(losses).mean())
            if skipped:
                self.skipped_steps += 1
                consecutive_bad += 1
                logger.warning("step %d: non-finite %s; update skipped (%d in a row, %d in total)", self.step,
                               "loss" if loss_bad else "grad norm", consecutive_bad, self.skipped_steps)
                if consecutive_bad >= config.train.max_consecutive_nonfinite:
                    exit_code = EXIT_NONFINITE  # stop after this step's log line, saving nothing
            else:
                consecutive_bad = 0

            if self.step % config.logging.interval == 0 or self.step == total_steps:
                self._log_step(interval_losses, usage, step_lr, grad_norm, interval_seconds, interval_steps,
                               run_train_seconds / max(1, self.step - run_start_step))
                interval_seconds, interval_steps, interval_losses = 0.0, 0, []

            if exit_code == EXIT_NONFINITE:
                good = self.last_saved or "none saved yet"
                logger.error("stopping: %d non-finite steps in a row (train.max_consecutive_nonfinite); "
                             "last good checkpoint: %s", consecutive_bad, good)
                break
            if config.eval.interval and self.step % config.eval.interval == 0 and self.step < total_steps:
                self.evaluate()
            if config.checkpoint.interval and self.step % config.checkpoint.interval == 0:
                self.save()
            if self._any_rank(bool(self.stop.received)):
                signum = self.stop.received or signal.SIGTERM
                if self.last_saved is None or self.last_saved.name != f"step_{self.step:08d}":
                    self.save()
                logger.warning("stopped by %s at step %d; checkpoint %s", signal.Signals(signum).name,
                               self.step, self.last_saved)
                return 128 + int(signum)
            if config.train.exit_at_step == self.step and self.step < total_steps:
                if self.last_saved is None or self.last_saved.name != f"step_{self.step:08d}":
                    self.save()
                logger.info("train.exit_at_step=%d reached; resume with --resume auto", self.step)
                return 0

        if exit_code == 0:
            if config.eval.iterations:
                self.evaluate()
            if config.checkpoint.save_at_exit and (self.last_saved is None
                                                   or self.last_saved.name != f"step_{self.step:08d}"):
                self.save()
            if self.rank == 0:
                logger.info("done: %d steps, %d skipped | run dir %s | checkpoint %s", self.step,
                            self.skipped_steps, config.logging.run_dir, self.last_saved)
        return exit_code

    def close(self) -> None:
        from cheems_parallel.parallel import destroy_parallel

        if hasattr(self, "metrics"):
            self.metrics.close()
        destroy_parallel()
        # Tear the default group down before the interpreter does: left to exit-time destructors, a rank of a
        # 2-stage gloo pipeline once aborted after a finished run ("terminate called without an active
        # exception", SIGABRT, exit status 1 for a run that had logged "done"), and torch warns about the leak.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are all NaN (debug.nonfinite_grad_at_steps)."""

    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def run(config: PretrainConfig, batch: BatchLayout) -> int:
    discover_ranks()  # RANK.. from torchrun/deepspeed, srun (SLURM_*) or MPI, before LOCAL_RANK picks the device
    trainer = Trainer(config, batch)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()
