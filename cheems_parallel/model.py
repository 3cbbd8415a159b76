"""CheemsForCausalLM (spec §1): embedding -> Cheems blocks by the layer pattern -> RMSNorm -> tied LM head.

Inputs are (b, l) token ids; the residual stream inside is sequence-first (l, b, D) and, with sequence
parallel, split along l over the tensor-parallel group. Logits come out vocab-parallel, (b, l, V / tp).
megatron-core's parallel_state must be initialised (cheems_parallel.parallel.initialize_parallel), also
for one process. The model holds no launch or I/O logic.
"""
import contextlib
from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from torch.utils.checkpoint import checkpoint

from .config import ConfigError, ModelConfig, ParallelConfig, validate_model
from .layers.block import CheemsBlock
from .layers.embedding import TokenEmbedding, causal_lm_loss, lm_logits
from .layers.ffn import expert_usage
from .layers.norms import RMSNorm
from .layers.tp import TensorParallelContext, normal_init, sharded_parameter, tp_size
from .ops.rope import rope_tables
from .parallel.state import model_parallel_config


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    metrics: dict = field(default_factory=dict)


@contextlib.contextmanager
def seeded(init_seed, index):
    """Build component `index` from seed init_seed + index, so that a pipeline stage, which builds only
    its own components, gets the same weights as the whole model (DeepSpeed's seed_layers does the same)."""
    if init_seed is not None:
        torch.manual_seed(init_seed + index)
    yield


def kernels_available() -> bool:
    try:
        import cheems_parallel.kernels.dmattn  # noqa: F401
        import cheems_parallel.kernels.ssd  # noqa: F401
    except ImportError:
        return False
    return True


class CheemsForCausalLM(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig | None = None, init_seed: int | None = None):
        super().__init__()
        parallel = parallel or ParallelConfig()
        validate_model(cfg, parallel)
        if parallel.tensor_parallel_size != tp_size():
            raise ConfigError(f"parallel.tensor_parallel_size={parallel.tensor_parallel_size} but the initialised "
                              f"tensor-parallel group has {tp_size()} ranks")
        self.cfg = cfg
        self.tp = TensorParallelContext(model_parallel_config(parallel))
        self.sequence_parallel = self.tp.sequence_parallel
        use_kernels = cfg.kernels == "auto" and kernels_available()
        # component indices 0 .. L+2 are the pipeline's layer indices (cheems_parallel.parallel.pipeline)
        with seeded(init_seed, 0):
            self.embedding = TokenEmbedding(cfg, self.tp)
        layers = []
        for i in range(cfg.num_layers):
            with seeded(init_seed, 1 + i):
                layers.append(CheemsBlock(cfg, self.tp, i, use_kernels))
        self.layers = torch.nn.ModuleList(layers)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, self.tp)
        self.lm_head = None
        if not cfg.tie_embeddings:
            with seeded(init_seed, cfg.num_layers + 2):
                self.lm_head = sharded_parameter((cfg.vocab_size, cfg.hidden_size), 0, normal_init(cfg.init_std))
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.activation_checkpointing = enabled

    # ------------------------------------------------------------------ forward
    def _embed(self, input_ids):
        return self.embedding(input_ids)

    def _logits(self, h):
        """h (l_local, b, D) -> vocab-parallel logits (b, l, V / tp)."""
        head = self.embedding.weight if self.lm_head is None else self.lm_head
        return lm_logits(self.final_norm(h), head, self.tp)

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
            loss = causal_lm_loss(logits, labels, loss_mask)
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
