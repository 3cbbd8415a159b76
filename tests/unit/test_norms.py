"""RMSNorm against the spec's formula evaluated in float64 (spec §1: g * x / sqrt(mean(x^2) + eps))."""
import pytest
import torch

from cheems_parallel.layers.norms import RMSNorm


def rms_norm_float64(x, weight, eps):
    x64 = x.double()
    return weight.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_rms_norm_matches_formula_with_gradients(dtype, bound, device):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(dtype=dtype, device=device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48) * 0.5 + 1)
    x = (torch.randn(3, 5, 48) * 3).to(dtype=dtype, device=device).requires_grad_()
    grad_out = torch.randn(3, 5, 48).to(dtype=dtype, device=device)
    out = norm(x)
    assert out.dtype == dtype
    grad_x, grad_w = torch.autograd.grad(out, (x, norm.weight), grad_out)

    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    ref = rms_norm_float64(x64, w64, 1e-5)
    ref_grad_x, ref_grad_w = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    for got, want in ((out, ref), (grad_x, ref_grad_x), (grad_w, ref_grad_w)):
        error = ((got.double() - want).norm() / want.norm()).item()
        assert error < bound, error


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_rounds_once_from_float32(device):
    """bf16 input: the result equals the float32 computation rounded once, not a chain of bf16 roundings."""
    torch.manual_seed(1)
    x = (torch.randn(4, 64) * 10).to(torch.bfloat16).to(device)
    norm = RMSNorm(64).to(dtype=torch.bfloat16, device=device)
    expected = rms_norm_float64(x.float(), norm.weight.float(), 1e-6).float().to(torch.bfloat16)
    mismatched = (norm(x) != expected).float().mean().item()
    assert mismatched < 0.02, mismatched


def test_rms_norm_float32_weight_on_bf16_input_is_not_rounded():
    torch.manual_seed(2)
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(1 + 1e-3 * torch.randn(32))  # differences below bf16's resolution near 1
    x = torch.randn(6, 32).to(torch.bfloat16)
    expected = rms_norm_float64(x, norm.weight, 1e-6).float().to(torch.bfloat16)
    assert (norm(x) != expected).float().mean().item() < 0.02
