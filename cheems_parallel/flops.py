"""Parameter counts and model FLOPs per token, from the config alone (the one place they are computed).

Training FLOPs per token = 3 x forward (backward = 2 x forward). Forward = 2 per multiply-add of every
weight a token touches (the LM head included, the embedding lookup not) + the sequence-mixing terms:
causal attention 2*h*d*l (QK^T and PV over l/2 keys on average) and SSD's chunked scan
h*(Q*(N + d) + 4*d*N) with Q = min(chunk, l). Elementwise work (norms, activations) is ignored,
as in Megatron's and PaLM's MFU accounting.
"""
import math

from .config import ModelConfig


def layer_parameters(cfg: ModelConfig, kind: str) -> tuple[int, int]:
    """(total, active per token) parameters of one layer with mixer kind 'S' or 'A'."""
    D, H, d, N, Hkv = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.state_size, cfg.kv_heads
    total = active = 4 * D                                     # two norms + two residual scales
    if kind == "S":
        mixer = D * H * d + 2 * D * H * N + D * H + 2 * H + (H if cfg.ssd_d_skip else 0) + H * d * D
        total += mixer
        active += mixer
    else:
        mixer = D * H * d + 2 * D * Hkv * d + Hkv * d * H + H + H * d * D
        total += mixer
        active += mixer
        if cfg.value_function == "inner":
            n_v = math.isqrt(cfg.value_num_experts)
            retrieval = D * cfg.value_retrieval_heads * cfg.value_retrieval_dim + cfg.value_retrieval_heads * n_v * cfg.value_retrieval_dim
            total += retrieval + cfg.value_num_experts * Hkv * d
            active += retrieval + cfg.value_retrieval_heads * cfg.value_topk * Hkv * d
    mlp = 3 * D * cfg.intermediate_size
    total += mlp
    active += mlp
    if cfg.ffn == "cdmoe":
        n = math.isqrt(cfg.num_experts)
        retrieval = D * cfg.expert_retrieval_heads * cfg.expert_retrieval_dim + cfg.expert_retrieval_heads * n * cfg.expert_retrieval_dim
        total += retrieval + 2 * cfg.num_experts * D
        active += retrieval + 2 * cfg.expert_retrieval_heads * cfg.experts_per_head * D
    return total, active


def parameter_counts(cfg: ModelConfig) -> dict:
    embedding = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_embeddings else embedding
    total = active = embedding + head + cfg.hidden_size        # + final norm
    for kind in cfg.mixers:
        layer_total, layer_active = layer_parameters(cfg, kind)
        total += layer_total
        active += layer_active
    return {"total": total, "active": active, "embedding": embedding}


def forward_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    counts = parameter_counts(cfg)
    # every active weight except the embedding lookup; a tied LM head still multiplies V x D
    matmul_params = counts["active"] - counts["embedding"] + (cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0)
    flops = 2.0 * matmul_params
    H, d, N = cfg.num_heads, cfg.head_dim, cfg.state_size
    chunk = min(cfg.ssd_chunk_size, seq_length)
    for kind in cfg.mixers:
        if kind == "A":
            window = min(seq_length, cfg.keep_window) if cfg.keep_window else seq_length
            flops += 2.0 * H * d * window
        else:
            flops += H * (chunk * (N + d) + 4.0 * d * N)
    return flops


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training (forward + backward) model FLOPs per token, for MFU."""
    return 3.0 * forward_flops_per_token(cfg, seq_length)
