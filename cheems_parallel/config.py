"""One typed configuration tree: dataclasses loaded from YAML, overridable with `--set a.b=c`.

The model library owns the `model` and `parallel` sections; the trainer (`pretrain.config`) composes them
with its own sections through the same loader. Every user mistake raises `ConfigError` with a one-line
message naming the field (and the file when one is known) and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(Exception):
    """A configuration a user wrote that cannot work; the message names the field and the fix."""


# ----------------------------------------------------------------------------------------------
# Model and parallel sections
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4                  # attention query heads and SSD heads
    num_kv_heads: Optional[int] = None  # attention key/value heads (GQA); None = num_heads
    # One letter per layer, S = SSD mixer, A = DMAttn; a shorter unit is tiled to num_layers.
    layer_pattern: str = "SSSSSSSA"
    ffn: str = "cdmoe"                  # "cdmoe" or "mlp" (SwiGLU)
    intermediate_size: int = 256        # shared SwiGLU width I
    # SSD
    ssd_state_size: Optional[int] = None  # N; None = head dim (required when ssd_rope is on)
    ssd_chunk_size: int = 256
    ssd_rope: bool = True
    ssd_d_skip: bool = True
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    # DMAttn
    value_function: str = "linear"      # "linear" or "inner"
    value_num_experts: int = 1024       # N_v rows of the inner value table (a perfect square)
    value_retrieval_heads: int = 1
    value_topk: int = 4
    value_retrieval_dim: int = 32
    keep_window: Optional[int] = None
    # CDMoE private experts
    num_experts: int = 1024             # E = n^2
    expert_retrieval_heads: int = 2     # H_x
    experts_per_head: int = 4           # k
    expert_retrieval_dim: int = 32      # r
    load_balance_coef: float = 0.0      # optional load-balance loss weight (0 = off)
    # shared
    rope_theta: float = 1e4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    document_masking: bool = False
    kernels: str = "auto"               # "auto" (Triton on CUDA, reference on CPU) or "reference"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def state_size(self) -> int:
        return self.ssd_state_size or self.head_dim

    @property
    def mixers(self) -> str:
        """The layer pattern tiled to num_layers: one letter per layer."""
        unit = self.layer_pattern
        return (unit * (self.num_layers // len(unit) + 1))[: self.num_layers]


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Private expert tables are split by rows over the tensor-parallel group (EP = TP, design.md);
    # None means exactly that, and any other value is refused.
    expert_parallel_size: Optional[int] = None
    sequence_parallel: Optional[bool] = None  # None = on exactly when tensor_parallel_size > 1

    @property
    def use_sequence_parallel(self) -> bool:
        if self.sequence_parallel is None:
            return self.tensor_parallel_size > 1
        return self.sequence_parallel and self.tensor_parallel_size > 1


def _is_square(value: int) -> bool:
    root = math.isqrt(value)
    return root * root == value


def validate_model(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Raise ConfigError for the first problem found, naming the field and the fix."""
    problems = model_problems(model, parallel)
    if problems:
        raise ConfigError(problems[0])


def model_problems(model: ModelConfig, parallel: ParallelConfig) -> list[str]:
    p: list[str] = []
    tp = parallel.tensor_parallel_size
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "ssd_chunk_size", "num_experts", "expert_retrieval_heads", "experts_per_head"):
        if getattr(model, name) <= 0:
            p.append(f"model.{name}={getattr(model, name)} must be positive")
    if p:
        return p
    if model.hidden_size % model.num_heads:
        p.append(f"model.hidden_size={model.hidden_size} is not divisible by model.num_heads={model.num_heads}")
    if model.head_dim % 2:
        p.append(f"head dim {model.head_dim} (hidden_size/num_heads) must be even for RoPE")
    if model.num_heads % model.kv_heads:
        p.append(f"model.num_heads={model.num_heads} is not divisible by model.num_kv_heads={model.kv_heads}")
    if not model.layer_pattern or set(model.layer_pattern) - {"S", "A"}:
        p.append(f"model.layer_pattern={model.layer_pattern!r} must be a non-empty string of S (SSD) and A (attention)")
    elif model.num_layers % len(model.layer_pattern):
        p.append(f"model.num_layers={model.num_layers} is not a multiple of len(model.layer_pattern)="
                 f"{len(model.layer_pattern)}; write the full pattern or change num_layers")
    if model.ffn not in ("cdmoe", "mlp"):
        p.append(f"model.ffn={model.ffn!r} must be 'cdmoe' or 'mlp'")
    if model.value_function not in ("linear", "inner"):
        p.append(f"model.value_function={model.value_function!r} must be 'linear' or 'inner'")
    if model.kernels not in ("auto", "reference"):
        p.append(f"model.kernels={model.kernels!r} must be 'auto' or 'reference'")
    if model.ssd_rope and model.state_size != model.head_dim:
        p.append(f"model.ssd_state_size={model.state_size} must equal the head dim {model.head_dim} while "
                 "model.ssd_rope is on (RoPE rotates B/C like Q/K); unset ssd_state_size or turn ssd_rope off")
    if model.state_size % 2 and model.ssd_rope:
        p.append(f"model.ssd_state_size={model.state_size} must be even for RoPE")
    if model.keep_window is not None and model.keep_window <= 0:
        p.append(f"model.keep_window={model.keep_window} must be positive or null")
    if not 0 < model.dt_min < model.dt_max:
        p.append(f"model.dt_min={model.dt_min} and model.dt_max={model.dt_max} need 0 < dt_min < dt_max")
    if model.ffn == "cdmoe":
        if not _is_square(model.num_experts):
            p.append(f"model.num_experts={model.num_experts} must be a perfect square (product keys: E = n^2)")
        elif model.experts_per_head > math.isqrt(model.num_experts):
            p.append(f"model.experts_per_head={model.experts_per_head} exceeds sqrt(num_experts)="
                     f"{math.isqrt(model.num_experts)}")
        if model.expert_retrieval_dim % 2:
            p.append(f"model.expert_retrieval_dim={model.expert_retrieval_dim} must be even (two half-keys)")
        if model.num_experts % tp:
            p.append(f"model.num_experts={model.num_experts} is not divisible by "
                     f"parallel.tensor_parallel_size={tp} (experts are split over the TP group)")
    if model.value_function == "inner" and "A" in model.layer_pattern:
        if not _is_square(model.value_num_experts):
            p.append(f"model.value_num_experts={model.value_num_experts} must be a perfect square")
        elif model.value_topk > math.isqrt(model.value_num_experts):
            p.append(f"model.value_topk={model.value_topk} exceeds sqrt(value_num_experts)")
        if model.value_retrieval_dim % 2:
            p.append(f"model.value_retrieval_dim={model.value_retrieval_dim} must be even")
    # parallel
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(parallel, name) < 1:
            p.append(f"parallel.{name}={getattr(parallel, name)} must be >= 1")
    if tp > 1:
        if model.num_heads % tp:
            p.append(f"model.num_heads={model.num_heads} is not divisible by parallel.tensor_parallel_size={tp}")
        if model.kv_heads % tp:
            p.append(f"model.num_kv_heads={model.kv_heads} is not divisible by parallel.tensor_parallel_size={tp}")
        if model.intermediate_size % tp:
            p.append(f"model.intermediate_size={model.intermediate_size} is not divisible by "
                     f"parallel.tensor_parallel_size={tp}")
        if model.vocab_size % tp:
            p.append(f"model.vocab_size={model.vocab_size} is not divisible by parallel.tensor_parallel_size={tp}")
    if parallel.expert_parallel_size not in (None, tp):
        p.append(f"parallel.expert_parallel_size={parallel.expert_parallel_size} must equal "
                 f"parallel.tensor_parallel_size={tp} or be left unset: private expert tables are split "
                 "over the tensor-parallel group")
    if parallel.pipeline_parallel_size > 1 and model.num_layers % parallel.pipeline_parallel_size:
        p.append(f"model.num_layers={model.num_layers} is not divisible by "
                 f"parallel.pipeline_parallel_size={parallel.pipeline_parallel_size}")
    return p


# ----------------------------------------------------------------------------------------------
# Generic loading: dict -> dataclass tree, YAML files, --set overrides
# ----------------------------------------------------------------------------------------------

def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    return value


def from_dict(cls, data: Any, where: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by their dotted path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    # fields marked metadata={"yaml": False} are bookkeeping (e.g. the file a config came from), not keys
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (known keys of {where}: {', '.join(sorted(names))})")
    kwargs = {name: _check_type(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the last one
    silently, so a second `train:` section would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(error, 'problem', error)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, parallel:, ...)")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` strings (values parsed as YAML scalars) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> tuple[ModelConfig, ParallelConfig]:
    """Read the model and parallel sections of a config file (other sections are the trainer's) and validate."""
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        model = from_dict(ModelConfig, data.get("model"), "model")
        parallel = from_dict(ParallelConfig, data.get("parallel"), "parallel")
        validate_model(model, parallel)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return model, parallel
