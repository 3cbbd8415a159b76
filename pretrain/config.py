"""The trainer's typed configuration: one YAML file -> one `PretrainConfig`, validated before any process group.

Sections (every key is listed in the dataclasses below; unknown keys are errors):
    model, parallel   - owned by the model library (`cheems_parallel.config`)
    data              - token shards (megatron .bin/.idx prefixes), tokenizer, sequence length, split
    train             - steps, batch sizes, precision, ZeRO stage, clipping, checkpointing of activations
    optimizer         - AdamW hyper-parameters (weight decay on matrices only)
    schedule          - warmup-stable-decay (default) or cosine learning-rate schedule
    eval              - validation interval and size
    checkpoint        - directory, interval, how many to keep, resume
    logging           - run directory (metrics.jsonl, TensorBoard), console interval, peak FLOP/s for MFU
    debug             - fault injection used by the tests (non-finite losses, a pause inside a save)

Batch arithmetic (derived once, in `derive_batch`):
    global_batch_size = micro_batch_size x data_parallel_size x gradient_accumulation_steps  (in sequences)
    data_parallel_size = world_size / (tensor_parallel_size x pipeline_parallel_size)

The DeepSpeed JSON (`train.deepspeed_config`, default `ds_config.json`) holds engine tuning only; the
values the trainer derives (batch sizes, ZeRO stage, precision, clipping) are filled into it by
`deepspeed_config_dict`, and a file that sets one of them to a different value is refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from cheems_parallel.config import (ConfigError, ModelConfig, ParallelConfig, apply_overrides, from_dict,
                                    model_problems, read_yaml)

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DataConfig:
    # Weighted blend of megatron dataset prefixes (path/to/name for name.bin + name.idx):
    # "0.7 path/a 0.3 path/b", a list ["0.7", "path/a", ...] or a plain list of prefixes (equal weights).
    blend: Any = None
    tokenizer_model: Optional[str] = None   # sentencepiece .model file
    seq_length: int = 256
    split: str = "969,30,1"                 # train,valid,test proportions of every dataset in the blend
    cache_dir: Optional[str] = None         # sample-index cache; None = <run_dir>/data_cache
    num_workers: int = 0                    # DataLoader worker processes per rank


@dataclass
class TrainConfig:
    steps: int = 100                        # optimizer steps (iterations) to train
    micro_batch_size: int = 4               # sequences per rank per forward
    global_batch_size: Optional[int] = None             # sequences per optimizer step, all ranks together
    gradient_accumulation_steps: Optional[int] = None   # None = derived from the global batch
    precision: str = "bf16"                 # "bf16" or "fp32" (fp16 is not offered: DeepSpeed refuses it on CPU)
    zero_stage: int = 1                     # DeepSpeed ZeRO stage 0..3
    gradient_clipping: float = 1.0          # max global grad norm; 0 = off
    activation_checkpointing: bool = False  # recompute each layer in backward
    seed: int = 1234                        # weights, data order
    max_consecutive_nonfinite: int = 5      # stop after this many skipped (non-finite) steps in a row
    gc_interval: int = 50                   # Python GC runs every N steps, never mid-step; 0 = automatic
    exit_at_step: Optional[int] = None      # save and exit after this step (a job shorter than the run)
    deepspeed_config: str = "ds_config.json"  # engine tuning; relative to the working dir or the repository
    device: str = "auto"                    # "auto" (CUDA when available), "cuda" or "cpu"


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4                    # floor reached at the end of the decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01              # on matrices (ndim >= 2) only


@dataclass
class ScheduleConfig:
    kind: str = "wsd"                       # "wsd" (warmup-stable-decay) or "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2             # wsd: the last fraction of the steps decays linearly to min_lr


@dataclass
class EvalConfig:
    interval: int = 100                     # evaluate every N steps and at the end; 0 = only at the end
    iterations: int = 10                    # micro-batches per rank per evaluation


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None               # None = <run_dir>/checkpoints
    interval: int = 100                     # save every N steps; 0 = only at exit
    keep_last: int = 3                      # completed checkpoints kept
    resume: Optional[str] = None            # None, "auto" (newest valid in dir) or a checkpoint directory
    save_at_exit: bool = True


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    interval: int = 10                      # console / metrics.jsonl / TensorBoard every N steps
    tensorboard: bool = True
    peak_flops_per_device: Optional[float] = None  # FLOP/s for MFU; None = known GPUs' bf16 peak, n/a on CPU


@dataclass
class DebugConfig:
    nonfinite_loss_at_steps: list[int] = field(default_factory=list)  # make these steps' loss NaN (tests)
    nonfinite_grad_at_steps: list[int] = field(default_factory=list)  # finite loss, NaN gradients (tests)
    pause_in_save_seconds: float = 0.0      # sleep after writing, before the rename (kill -9 tests)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    source: str = field(default="<config>", metadata={"yaml": False})   # the file it came from, for messages

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("source")
        return data


@dataclass
class BatchLayout:
    world_size: int
    data_parallel_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read YAML, apply `--set` overrides, build the typed tree. Raises ConfigError naming the file."""
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        config = from_dict(PretrainConfig, data, "config")
    except ConfigError as error:
        raise ConfigError(f"{path}: {str(error).replace('config.', '')}") from None
    config.source = str(path)
    return config


def world_size_from_environment() -> int:
    """The number of ranks, read before any process group exists (torchrun/deepspeed, MPI, Slurm), from the
    same source `distributed_env.discover_ranks` will take them from: a stray WORLD_SIZE without RANK, or
    SLURM_NTASKS in a batch shell outside srun, is a world of one there too."""
    from .distributed_env import world_size_of

    return world_size_of(os.environ)


def derive_batch(config: PretrainConfig, world_size: int) -> BatchLayout:
    """The one place batch sizes are derived and checked against the world size."""
    train, parallel = config.train, config.parallel
    model_parallel = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor_parallel_size x "
                          f"parallel.pipeline_parallel_size = {model_parallel}; change the launch or the layout")
    data_parallel = world_size // model_parallel
    if train.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size={train.micro_batch_size} must be >= 1")
    per_step = train.micro_batch_size * data_parallel
    if train.global_batch_size is None:
        accumulation = train.gradient_accumulation_steps or 1
        if accumulation < 1:
            raise ConfigError(f"train.gradient_accumulation_steps={accumulation} must be >= 1")
        global_batch = per_step * accumulation
    else:
        global_batch = train.global_batch_size
        if global_batch < 1 or global_batch % per_step:
            raise ConfigError(
                f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size x data "
                f"parallel size = {train.micro_batch_size} x {data_parallel} = {per_step}; pick a multiple of {per_step}")
        accumulation = global_batch // per_step
        if train.gradient_accumulation_steps not in (None, accumulation):
            raise ConfigError(
                f"train.gradient_accumulation_steps={train.gradient_accumulation_steps} disagrees with "
                f"global_batch_size {global_batch} / (micro {train.micro_batch_size} x data parallel {data_parallel}) "
                f"= {accumulation}; set only one of them")
    return BatchLayout(world_size, data_parallel, train.micro_batch_size, accumulation, global_batch)


# ----------------------------------------------------------------------------------------------
# Validation: every problem, before any process group starts
# ----------------------------------------------------------------------------------------------

def config_problems(config: PretrainConfig, world_size: int) -> list[str]:
    problems: list[str] = []
    train, parallel = config.train, config.parallel
    if train.zero_stage not in (0, 1, 2, 3):
        problems.append(f"train.zero_stage={train.zero_stage} must be 0, 1, 2 or 3")
    if train.zero_stage >= 2 and parallel.pipeline_parallel_size > 1:
        problems.append(f"train.zero_stage={train.zero_stage} cannot combine with parallel.pipeline_parallel_size="
                        f"{parallel.pipeline_parallel_size} (DeepSpeed pipelines support ZeRO <= 1); "
                        "use zero_stage 0/1 or no pipeline")
    if parallel.pipeline_parallel_size > 1 and config.model.load_balance_coef > 0:
        problems.append(f"model.load_balance_coef={config.model.load_balance_coef} cannot combine with "
                        f"parallel.pipeline_parallel_size={parallel.pipeline_parallel_size} (only the hidden state "
                        "travels between stages); set it to 0 or use no pipeline")
    problems += model_problems(config.model, parallel)
    try:
        derive_batch(config, world_size)
    except ConfigError as error:
        problems.append(str(error))
    if train.precision not in ("bf16", "fp32"):
        problems.append(f"train.precision={train.precision!r} must be 'bf16' or 'fp32'")
    if train.device not in ("auto", "cuda", "cpu"):
        problems.append(f"train.device={train.device!r} must be 'auto', 'cuda' or 'cpu'")
    if train.steps < 1:
        problems.append(f"train.steps={train.steps} must be >= 1")
    if train.exit_at_step is not None and not 1 <= train.exit_at_step <= train.steps:
        problems.append(f"train.exit_at_step={train.exit_at_step} must be in [1, train.steps={train.steps}]")
    if train.gradient_clipping < 0:
        problems.append(f"train.gradient_clipping={train.gradient_clipping} must be >= 0 (0 = off)")
    if train.max_consecutive_nonfinite < 1:
        problems.append(f"train.max_consecutive_nonfinite={train.max_consecutive_nonfinite} must be >= 1")
    if train.gc_interval < 0:
        problems.append(f"train.gc_interval={train.gc_interval} must be >= 0 (0 = Python's automatic collection)")
    optimizer = config.optimizer
    if not optimizer.lr > 0:   # also NaN (--set optimizer.lr=.nan)
        problems.append(f"optimizer.lr={optimizer.lr} must be positive")
    if not 0 <= optimizer.min_lr <= optimizer.lr:
        problems.append(f"optimizer.min_lr={optimizer.min_lr} must be in [0, optimizer.lr={optimizer.lr}]")
    if len(optimizer.betas) != 2 or not all(0 <= beta < 1 for beta in optimizer.betas):
        problems.append(f"optimizer.betas={optimizer.betas} must be two numbers in [0, 1)")
    if optimizer.weight_decay < 0:
        problems.append(f"optimizer.weight_decay={optimizer.weight_decay} must be >= 0")
    schedule = config.schedule
    if schedule.kind not in ("wsd", "cosine"):
        problems.append(f"schedule.kind={schedule.kind!r} must be 'wsd' or 'cosine'")
    if schedule.warmup_steps < 0:
        problems.append(f"schedule.warmup_steps={schedule.warmup_steps} must be >= 0")
    if not 0 <= schedule.decay_fraction <= 1:
        problems.append(f"schedule.decay_fraction={schedule.decay_fraction} must be in [0, 1]")
    if config.eval.interval < 0 or config.eval.iterations < 0:
        problems.append("eval.interval and eval.iterations must be >= 0")
    checkpoint = config.checkpoint
    if checkpoint.interval < 0:
        problems.append(f"checkpoint.interval={checkpoint.interval} must be >= 0 (0 = only at exit)")
    if checkpoint.keep_last < 1:
        problems.append(f"checkpoint.keep_last={checkpoint.keep_last} must be >= 1")
    if checkpoint.resume not in (None, "auto") and not Path(checkpoint.resume).is_dir():
        problems.append(f"checkpoint.resume={checkpoint.resume!r}: no such checkpoint directory "
                        "(use 'auto' for the newest in checkpoint.dir)")
    if config.logging.interval < 1:
        problems.append(f"logging.interval={config.logging.interval} must be >= 1")
    for field_name, directory in (("logging.run_dir", config.logging.run_dir), ("checkpoint.dir", checkpoint.dir),
                                  ("data.cache_dir", config.data.cache_dir)):
        problem = _directory_problem(directory)
        if problem:
            problems.append(f"{field_name}={directory}: {problem}")
    problems += _data_problems(config)
    problems += _deepspeed_file_problems(config)
    return problems


def _directory_problem(directory: str | None) -> str | None:
    """Why the run could not create or write `directory` (None when it can, or when it is not set yet)."""
    if directory is None:
        return None
    path = Path(directory).absolute()
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write into {existing}"
    return None


def _data_problems(config: PretrainConfig) -> list[str]:
    data = config.data
    problems = []
    if data.seq_length < 1:
        problems.append(f"data.seq_length={data.seq_length} must be >= 1")
    parts = data.split.replace("/", ",").split(",")
    if len(parts) != 3 or not all(part.strip().replace(".", "", 1).isdigit() for part in parts) \
            or sum(float(part) for part in parts) <= 0:
        problems.append(f"data.split={data.split!r} must be three non-negative numbers like '969,30,1'")
    elif float(parts[0]) <= 0:
        problems.append(f"data.split={data.split!r} gives the training split no data")
    split_ok = not problems or not problems[-1].startswith("data.split=")
    prefixes = []
    if data.blend is None:
        problems.append("data.blend is not set: name at least one dataset prefix (path/name for name.bin + name.idx)")
    else:
        from data_tools.blend import parse_blend
        from data_tools.errors import DataError
        try:
            prefixes, _ = parse_blend(data.blend)
        except DataError as error:
            problems.append(f"data.{error}")
    shard_vocabularies = {}   # prefix -> vocab_size recorded in its .meta.json by data_tools.preprocess
    for prefix in prefixes:
        missing = [suffix for suffix in (".bin", ".idx") if not Path(prefix + suffix).is_file()]
        if missing:
            problems.append(f"data.blend: {prefix}{missing[0]} does not exist (build it with python -m data_tools.preprocess)")
            continue
        if split_ok:
            problems += _split_problems(prefix, data.split)
        recorded = _recorded_vocab_size(prefix)
        if recorded is not None:
            shard_vocabularies[prefix] = recorded
            if recorded > config.model.vocab_size:
                problems.append(f"data.blend: {prefix} was tokenized with a {recorded}-token vocabulary "
                                f"({prefix}.meta.json) but model.vocab_size={config.model.vocab_size}; "
                                "re-tokenize it or raise model.vocab_size")
    if data.tokenizer_model is None:
        problems.append("data.tokenizer_model is not set (a sentencepiece .model file)")
    elif not Path(data.tokenizer_model).is_file():
        problems.append(f"data.tokenizer_model={data.tokenizer_model}: file not found")
    else:
        from data_tools.errors import DataError
        from data_tools.tokenizer import load_tokenizer
        try:
            vocab_size = load_tokenizer(data.tokenizer_model).vocab_size
        except DataError as error:
            problems.append(f"data.tokenizer_model: {error}")
        except Exception as error:  # sentencepiece raises plain RuntimeError/OSError on a bad file
            problems.append(f"data.tokenizer_model={data.tokenizer_model}: not a sentencepiece model ({error})")
        else:
            if vocab_size > config.model.vocab_size:
                problems.append(f"data.tokenizer_model has {vocab_size} tokens but model.vocab_size="
                                f"{config.model.vocab_size}; raise model.vocab_size or use a smaller tokenizer")
            for prefix, recorded in shard_vocabularies.items():
                if recorded != vocab_size:
                    problems.append(f"data.blend: {prefix}.meta.json records a {recorded}-token tokenizer but "
                                    f"data.tokenizer_model={data.tokenizer_model} has {vocab_size}: the shard was "
                                    "made with another tokenizer")
                    break
    if data.num_workers < 0:
        problems.append(f"data.num_workers={data.num_workers} must be >= 0")
    return problems


def _recorded_vocab_size(prefix: str) -> int | None:
    """The vocabulary size data_tools.preprocess recorded in PREFIX.meta.json (None when absent/unreadable)."""
    from data_tools.errors import DataError
    from data_tools.verify import shard_metadata

    try:
        value = shard_metadata(prefix).get("vocab_size")
    except (OSError, DataError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _split_problems(prefix: str, split: str) -> list[str]:
    """A split with a positive weight but no documents of this shard makes megatron-core's GPTDataset loop
    forever looking for tokens (data_tools.splits.empty_split): refuse it before any process starts."""
    from data_tools.errors import DataError
    from data_tools.indexed import read_index
    from data_tools.splits import empty_split_problem

    try:
        documents = read_index(prefix).num_documents
    except DataError as error:
        return [f"data.blend: {error}"]
    weights = [float(part) for part in split.replace("/", ",").split(",")]   # checked by the caller
    empty = empty_split_problem(prefix, documents, weights)
    return [f"data.split={split!r}: {empty}"] if empty else []


def resolve_deepspeed_config_path(config: PretrainConfig) -> Path:
    path = Path(config.train.deepspeed_config)
    if path.is_absolute() or path.is_file():
        return path
    return REPOSITORY_ROOT / path


# Keys of ds_config.json that the trainer derives from the YAML; the file may leave them out or say "auto".
_DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping")
_REFUSED_SECTIONS = {"optimizer": "optimizer:", "scheduler": "schedule:", "fp16": "train.precision"}


def _read_deepspeed_file(config: PretrainConfig) -> tuple[Path, dict]:
    path = resolve_deepspeed_config_path(config)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config={config.train.deepspeed_config}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return path, data


def _deepspeed_file_problems(config: PretrainConfig) -> list[str]:
    try:
        path, data = _read_deepspeed_file(config)
    except ConfigError as error:
        return [str(error)]
    problems = []
    for section, owner in _REFUSED_SECTIONS.items():
        if section in data:
            problems.append(f"{path}: remove \"{section}\"; the trainer builds it from the YAML's {owner}")
    for key in _DERIVED_KEYS:
        if data.get(key, "auto") != "auto":
            problems.append(f"{path}: remove \"{key}\" (or write \"auto\"); it is derived from the YAML's train: section")
    zero = data.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(f"{path}: \"zero_optimization\" must be an object")
    elif zero.get("stage", config.train.zero_stage) != config.train.zero_stage:
        problems.append(f"{path}: zero_optimization.stage={zero['stage']} disagrees with train.zero_stage="
                        f"{config.train.zero_stage}; set the stage in the YAML only")
    if "bf16" in data and data["bf16"].get("enabled", "auto") not in ("auto", config.train.precision == "bf16"):
        problems.append(f"{path}: bf16.enabled disagrees with train.precision={config.train.precision}; "
                        "set precision in the YAML only")
    return problems


def validate(config: PretrainConfig, world_size: int) -> BatchLayout:
    """Raise one ConfigError listing the first problem (and how many more) with the file name."""
    problems = config_problems(config, world_size)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise ConfigError(f"{config.source}: {problems[0]}{more}")
    return derive_batch(config, world_size)


def deepspeed_config_dict(config: PretrainConfig, batch: BatchLayout, clip_in_engine: bool) -> dict:
    """ds_config.json with the derived values filled in (the one place the JSON is merged)."""
    _, data = _read_deepspeed_file(config)
    data = json.loads(json.dumps(data))  # deep copy
    data["train_batch_size"] = batch.global_batch_size
    data["train_micro_batch_size_per_gpu"] = batch.micro_batch_size
    data["gradient_accumulation_steps"] = batch.gradient_accumulation_steps
    # With ZeRO-0 in fp32 DeepSpeed calls our optimizer directly; it clips there itself (see optimizer.py).
    data["gradient_clipping"] = config.train.gradient_clipping if clip_in_engine else 0.0
    data.setdefault("zero_optimization", {})["stage"] = config.train.zero_stage
    bf16 = data.setdefault("bf16", {})
    bf16["enabled"] = config.train.precision == "bf16"
    if uses_norm_guard(config, data):
        # DeepSpeed's bf16 default checks every gradient tensor for inf/NaN before the step (about 7 small
        # kernels per parameter tensor, then a host sync: 3.3k launches a step for cheems-320m). The global
        # grad norm it computes anyway is non-finite in exactly those cases, and GuardedAdamW skips on it.
        bf16.setdefault("check_grad_overflow", False)
    data.setdefault("zero_allow_untested_optimizer", True)
    return data


def uses_norm_guard(config: PretrainConfig, deepspeed_data: dict) -> bool:
    """ZeRO-1/2 in bf16 without pipeline parallel: the non-finite guard reads DeepSpeed's global grad norm
    (which it computes unless the user turned that off) instead of DeepSpeed's per-tensor check."""
    zero = deepspeed_data.get("zero_optimization", {})
    return (config.train.precision == "bf16" and config.train.zero_stage in (1, 2)
            and config.parallel.pipeline_parallel_size == 1 and zero.get("compute_grad_norm", True) is not False)


def default_paths(config: PretrainConfig) -> None:
    """Fill the paths that default relative to the run directory."""
    run_dir = Path(config.logging.run_dir)
    if config.checkpoint.dir is None:
        config.checkpoint.dir = str(run_dir / "checkpoints")
    if config.data.cache_dir is None:
        config.data.cache_dir = str(run_dir / "data_cache")
