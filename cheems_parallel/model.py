"""CheemsForCausalLM (spec §1): embedding -> Cheems blocks by the layer pattern -> RMSNorm -> tied LM head.

Inputs are (b, l) token ids; the residual stream inside is sequence-first (l, b, D) and, with sequence
parallel, split along l over the tensor-parallel group. Logits come out vocab-parallel, (b, l, V / tp).
megatron-core's parallel_state must be initialised (cheems_parallel.parallel.initialize_parallel), also
for one process. The model holds no launch or I/O logic.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)
from torch.utils.checkpoint import checkpoint

from .config import ConfigError, ModelConfig, ParallelConfig, validate_model
from .layers.block import CheemsBlock
from .layers.ffn import expert_usage
from .layers.norms import RMSNorm
from .layers.tp import TensorParallelContext, linear_out, normal_init, tp_size
from .ops.rope import rope_tables
from .parallel.state import model_parallel_config


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    metrics: dict = field(default_factory=dict)


def _kernels_available() -> bool:
    try:
        import cheems_parallel.kernels.dmattn  # noqa: F401
        import cheems_parallel.kernels.ssd  # noqa: F401
    except ImportError:
        return False
    return True


class CheemsForCausalLM(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig | None = None):
        super().__init__()
        parallel = parallel or ParallelConfig()
        validate_model(cfg, parallel)
        if parallel.tensor_parallel_size != tp_size():
            raise ConfigError(f"parallel.tensor_parallel_size={parallel.tensor_parallel_size} but the initialised "
                              f"tensor-parallel group has {tp_size()} ranks")
        self.cfg = cfg
        self.tp = TensorParallelContext(model_parallel_config(parallel))
        self.sequence_parallel = self.tp.sequence_parallel
        use_kernels = cfg.kernels == "auto" and _kernels_available()
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std),
                                                reduce_scatter_embeddings=self.sequence_parallel, config=self.tp.config)
        self.layers = torch.nn.ModuleList(CheemsBlock(cfg, self.tp, i, use_kernels) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, self.tp)
        self.lm_head = None if cfg.tie_embeddings else self.tp.column(cfg.hidden_size, cfg.vocab_size, cfg.init_std)
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = enabled

    # ------------------------------------------------------------------ forward
    def _embed(self, input_ids):
        h = self.embedding(input_ids)
        # VocabParallelEmbedding returns (l/tp, b, D) under SP, else (b, l, D)
        return h if self.sequence_parallel else h.transpose(0, 1).contiguous()

    def _logits(self, h):
        """h (l_local, b, D) -> vocab-parallel logits (b, l, V / tp)."""
        h = self.final_norm(h)
        if self.sequence_parallel:
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
        if self.lm_head is not None:
            return linear_out(self.lm_head, h).transpose(0, 1)
        if tp_size() > 1 and not self.sequence_parallel:
            h = copy_to_tensor_model_parallel_region(h)
        return F.linear(h, self.embedding.weight).transpose(0, 1)

    def forward(self, input_ids, position_ids=None, labels=None, loss_mask=None, segment_ids=None):
        b, l = input_ids.shape
        if self.sequence_parallel and l % tp_size():
            raise ConfigError(f"sequence length {l} must be divisible by tensor_parallel_size={tp_size()} "
                              "with sequence parallel on")
        if position_ids is None:
            position_ids = torch.arange(l, device=input_ids.device).expand(b, l)
        if not self.cfg.document_masking:
            segment_ids = None
        cos, sin = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        h = self._embed(input_ids)
        aux_loss = None
        metrics = {}
        for index, layer in enumerate(self.layers):
            if self.activation_checkpointing and self.training:
                h, stats = checkpoint(layer, h, cos, sin, segment_ids, use_reentrant=False)
            else:
                h, stats = layer(h, cos, sin, segment_ids)
            if stats is not None:
                ids, weights = stats
                hit, entropy = expert_usage(ids, self.cfg.num_experts)
                metrics[f"experts/hit_fraction/layer{index}"] = hit
                metrics[f"experts/entropy/layer{index}"] = entropy
                if self.cfg.load_balance_coef > 0 and self.training:
                    lb = layer.ffn.load_balance_loss(ids, weights)
                    aux_loss = lb if aux_loss is None else aux_loss + lb
        logits = self._logits(h)
        loss = None
        if labels is not None:
            token_loss = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                                      labels.transpose(0, 1).contiguous()).transpose(0, 1)
            if loss_mask is None:
                loss = token_loss.mean()
            else:
                loss_mask = loss_mask.float()
                loss = (token_loss * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)
            if aux_loss is not None:
                metrics["experts/load_balance_loss"] = aux_loss.detach()
                loss = loss + self.cfg.load_balance_coef * aux_loss / max(1, len(self.layers))
        return CausalLMOutput(loss=loss, logits=logits, metrics=metrics)

    # ------------------------------------------------------------------ decoding
    def _full_logits_last(self, h):
        logits = self._logits(h)[:, -1]                                           # (b, V / tp)
        return gather_from_tensor_model_parallel_region(logits) if tp_size() > 1 else logits

    @torch.no_grad()
    def prefill(self, input_ids):
        """Forward over a prompt that returns last-token logits (b, V) and the per-layer decode caches."""
        if self.sequence_parallel:
            raise ConfigError("generate() needs sequence_parallel off (set parallel.sequence_parallel: false)")
        b, l = input_ids.shape
        cos, sin = rope_tables(torch.arange(l, device=input_ids.device).expand(b, l), self.cfg.head_dim,
                               self.cfg.rope_theta)
        h = self._embed(input_ids)
        caches = []
        for layer in self.layers:
            h, cache = layer.prefill(h, cos, sin)
            caches.append(cache)
        return self._full_logits_last(h), caches

    @torch.no_grad()
    def decode_step(self, token, position, caches):
        """token (b,) at absolute position `position` -> (logits (b, V), caches)."""
        b = token.shape[0]
        pos = torch.full((b, 1), position, device=token.device, dtype=torch.long)
        cos, sin = rope_tables(pos, self.cfg.head_dim, self.cfg.rope_theta)
        h = self._embed(token[:, None])
        new_caches = []
        for layer, cache in zip(self.layers, caches):
            h, cache = layer.step(h, cos, sin, cache)
            new_caches.append(cache)
        return self._full_logits_last(h), new_caches

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, eod_id=None, generator=None):
        """Sample continuations with the SSD states and KV caches. Returns (b, l0 + new) ids.

        Under TP every rank must pass the same `generator` seed so all ranks pick the same tokens.
        """
        was_training = self.training
        self.eval()
        logits, caches = self.prefill(input_ids)
        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if temperature <= 0:
                next_token = logits.argmax(-1)
            else:
                scaled = logits.float() / temperature
                if top_k is not None:
                    kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                next_token = torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator)[:, 0]
            if eod_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eod_id), next_token)
                finished |= next_token == eod_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if eod_id is not None and bool(finished.all()):
                break
            if step + 1 < max_new_tokens:
                logits, caches = self.decode_step(next_token, tokens.shape[1] - 1, caches)
        self.train(was_training)
        return tokens
