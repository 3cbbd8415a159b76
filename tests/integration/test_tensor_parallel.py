"""TP=2 (with and without sequence parallel) on 2 gloo ranks == one process: logits, loss and every
gradient within 1e-5 relative in fp32, from the same seed (weights are built from the same master tensors)."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from cheems_parallel.config import ModelConfig, ParallelConfig
from tests.conftest import free_port

MODEL = dict(vocab_size=256, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=48,
             ssd_chunk_size=8, layer_pattern="SA", num_experts=64, expert_retrieval_heads=2, experts_per_head=3,
             expert_retrieval_dim=8, value_function="inner", value_num_experts=16, value_topk=2,
             value_retrieval_dim=8, keep_window=5, load_balance_coef=0.01)


def run_model(parallel, seed=0):
    """Build the tiny model, run one forward/backward on fixed data; return logits, loss and grads with shard info."""
    from cheems_parallel.model import CheemsForCausalLM

    torch.manual_seed(seed)
    model = CheemsForCausalLM(ModelConfig(**MODEL), parallel)
    from megatron.core import parallel_state
    rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    for layer in model.layers:   # exercise the dynamic mask (A' = 0 at init makes it constant), same values in every layout
        if layer.mixer_kind == "A":
            with torch.no_grad():
                layer.mixer.mask_scale.copy_(torch.linspace(-1.5, 1.0, MODEL["num_heads"]).chunk(size)[rank])
    data = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 17), generator=data)
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    grads = {name: (p.grad.detach().clone(), getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None)
             for name, p in model.named_parameters()}
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": grads}


def _rank_main(rank, world, port, out_dir):
    """Both TP=2 runs, without and with sequence parallel, one after the other in the same two ranks (a spawned
    rank spends ~10 s importing torch and megatron-core; run_model reseeds, so each run is independent)."""
    import torch.distributed as dist

    from cheems_parallel.parallel import initialize_parallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for sequence_parallel in (False, True):
        parallel = ParallelConfig(tensor_parallel_size=2, sequence_parallel=sequence_parallel)
        initialize_parallel(parallel)   # megatron-core's groups made anew for each run
        torch.save(run_model(parallel), os.path.join(out_dir, f"rank{rank}_sp{int(sequence_parallel)}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp2_outputs(tmp_path_factory):
    """The directory holding each rank's results of both TP=2 runs, from one spawn of the two ranks."""
    out_dir = tmp_path_factory.mktemp("tp2_ranks")
    mp.start_processes(_rank_main, args=(2, free_port(), str(out_dir)), nprocs=2, start_method="spawn")
    return out_dir


def assert_close(got, ref, what):
    scale = ref.abs().max().clamp_min(1e-6)
    err = (got - ref).abs().max() / scale
    assert err < 1e-5, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_equals_one_process(sequence_parallel, tp2_outputs, single_process_group):
    reference = run_model(ParallelConfig())
    ranks = [torch.load(tp2_outputs / f"rank{r}_sp{int(sequence_parallel)}.pt") for r in range(2)]
    assert_close(torch.cat([r["logits"] for r in ranks], dim=-1), reference["logits"], "logits (vocab-parallel)")
    for r in ranks:
        assert_close(r["loss"], reference["loss"], "loss")
    checked_sharded = 0
    for name, (ref_grad, _) in reference["grads"].items():
        grad0, dim = ranks[0]["grads"][name]
        if dim is None:   # replicated: every rank holds the full gradient
            for r in ranks:
                assert_close(r["grads"][name][0], ref_grad, f"grad {name}")
        else:
            checked_sharded += 1
            assert_close(torch.cat([r["grads"][name][0] for r in ranks], dim=dim), ref_grad, f"grad {name} (split dim {dim})")
    assert checked_sharded > 20
