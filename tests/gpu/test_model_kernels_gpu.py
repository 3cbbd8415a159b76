"""On CUDA the model's layers call the Triton kernels (ssd_fused, dmattn_fused); the same model with
model.kernels=reference uses the pure-PyTorch ops. Same seed, same data: logits, loss and every
gradient must agree. fp32: logits and loss within 1e-3 relative; gradients within 5e-3, because Triton's
fp32 dot runs in TF32 and a parameter's gradient sums over every token (measured on the H200: worst
1.5e-3, d mask_scale with keep-window and documents). Skipped without CUDA."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels in the model)")

MODEL = dict(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256, ssd_chunk_size=64,
             layer_pattern="SA", num_experts=64, expert_retrieval_heads=2, experts_per_head=4, expert_retrieval_dim=16,
             value_function="inner", value_num_experts=64, value_topk=4, value_retrieval_dim=16)


def run(kernels, **overrides):
    from cheems_parallel.config import ModelConfig, ParallelConfig
    from cheems_parallel.model import CheemsForCausalLM
    model = CheemsForCausalLM(ModelConfig(**{**MODEL, **overrides, "kernels": kernels}), ParallelConfig(),
                              init_seed=3).cuda()
    for layer in model.layers:   # a non-constant dynamic mask (A' = 0 at init makes it constant)
        if layer.mixer_kind == "A":
            with torch.no_grad():
                layer.mixer.mask_scale.copy_(torch.linspace(-1.0, 1.0, MODEL["num_heads"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MODEL["vocab_size"], (2, 301), generator=g).cuda()
    segments = torch.cat([torch.zeros(2, 120), torch.ones(2, 180)], 1).long().cuda()
    positions = torch.cat([torch.arange(120), torch.arange(180)]).expand(2, 300).cuda()
    out = model(ids[:, :-1], labels=ids[:, 1:], position_ids=positions, segment_ids=segments)
    out.loss.backward()
    uses = any(getattr(m, "use_kernels", False) for m in model.modules())
    return uses, out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [{}, {"keep_window": 40, "document_masking": True}])
def test_model_with_kernels_equals_reference_ops(overrides, single_process_group):
    uses_kernels, logits, loss, grads = run("auto", **overrides)
    uses_reference, ref_logits, ref_loss, ref_grads = run("reference", **overrides)
    assert uses_kernels and not uses_reference
    relative = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()  # noqa: E731
    assert relative(logits, ref_logits) < 1e-3
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * abs(ref_loss.item())
    worst = max((relative(grads[n], g), n) for n, g in ref_grads.items() if g.norm() > 0)
    assert worst[0] < 5e-3, worst
