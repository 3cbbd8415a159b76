"""pretrain.optimizer: weight decay on matrices only; a skippable, clipping AdamW step vs torch's own."""
import copy

import pytest
import torch

from pretrain.optimizer import GuardedAdamW, parameter_groups


def test_weight_decay_on_matrices_only(single_process_group):
    from cheems_parallel.config import ModelConfig, ParallelConfig
    from cheems_parallel.model import CheemsForCausalLM

    torch.manual_seed(0)
    model = CheemsForCausalLM(ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, layer_pattern="SA",
                                          num_heads=2, intermediate_size=64, num_experts=16,
                                          experts_per_head=2, expert_retrieval_dim=8), ParallelConfig())
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    for name in not_decayed:
        assert any(part in name for part in ("norm", "residual_scale", "A_log", "dt_bias", ".D", "mask_scale")), name
    assert any(name.endswith("A_log") for name in not_decayed)
    assert any(name.endswith("dt_bias") for name in not_decayed)
    assert "embedding.embedding.weight" in decayed
    assert all(model.get_parameter(name).ndim >= 2 for name in decayed)


@pytest.fixture
def deepspeed_comm(single_process_group):
    """DeepSpeed's comm layer on the already-initialised one-process gloo group (its clip needs it)."""
    import importlib

    import deepspeed
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # skip a ~50 s JIT build
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    loss = model(torch.randn(4, 8)).pow(2).sum() * 10
    loss.backward()
    return model


def test_clipped_step_equals_torch_clip_then_adamw(deepspeed_comm):
    model = _model_and_grads()
    reference = copy.deepcopy(model)
    for mine, reference_parameter in zip(model.parameters(), reference.parameters()):
        reference_parameter.grad = mine.grad.clone()
    ours = GuardedAdamW(parameter_groups(model, 0.01), lr=1e-2, betas=(0.9, 0.95), clip_max_norm=0.5)
    theirs = torch.optim.AdamW(parameter_groups(reference, 0.01), lr=1e-2, betas=(0.9, 0.95))
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    ours.step()
    theirs.step()
    assert ours._global_grad_norm == pytest.approx(float(expected_norm), rel=1e-6)
    assert expected_norm > 0.5  # clipping really happened
    for mine, reference_parameter in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, reference_parameter, rtol=1e-6, atol=1e-7)


def test_non_finite_gradient_or_skip_flag_leaves_parameters_unchanged(deepspeed_comm):
    model = _model_and_grads()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = GuardedAdamW(parameter_groups(model, 0.01), lr=1e-2, clip_max_norm=1.0)
    next(model.parameters()).grad[0, 0] = float("nan")
    optimizer.step()
    assert optimizer.overflow
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    model = _model_and_grads()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = GuardedAdamW(parameter_groups(model, 0.01), lr=1e-2)
    optimizer.skip_next = True
    optimizer.step()
    assert optimizer.overflow and not optimizer.skip_next
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    optimizer.step()                                   # the flag applies to one step only
    assert not optimizer.overflow
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_norm_guard_skips_every_group_of_a_step_on_one_read(deepspeed_comm):
    """ZeRO calls the optimizer once per parameter group; a non-finite global norm must skip them all,
    reading the norm (a host sync) once per step, and a later finite norm steps again."""
    model = _model_and_grads()
    groups = parameter_groups(model, 0.01)
    optimizer = GuardedAdamW(groups, lr=1e-2)
    reads = []

    class CountingNorm(torch.Tensor):
        def __float__(self):
            reads.append(1)
            return super().__float__()

    norm = torch.tensor(float("nan")).as_subclass(CountingNorm)
    optimizer.norm_guard = lambda: norm
    before = [p.detach().clone() for p in model.parameters()]
    all_groups = optimizer.param_groups
    for group in all_groups:               # as DeepSpeed's ZeRO-1/2 step does
        optimizer.param_groups = [group]
        optimizer.step()
        assert optimizer.overflow
    optimizer.param_groups = all_groups
    assert len(reads) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    norm = torch.tensor(3.0)
    optimizer.step()
    assert not optimizer.overflow
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
