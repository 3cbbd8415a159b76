"""Pipeline parallel (DeepSpeed PipelineModule, 2 stages on 2 gloo ranks) == one process without DeepSpeed:
same seed, same global batch (2 micro-batches of 2), plain AdamW with global-norm clipping (the clip
needs the norm over both stages, the tied embedding counted once); loss curves agree to 1e-5 relative."""
import importlib
import json
import os

import torch
import torch.multiprocessing as mp

from cheems_parallel.config import ModelConfig, ParallelConfig
from tests.conftest import free_port

MODEL = dict(vocab_size=128, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=48, ssd_chunk_size=8,
             layer_pattern="SA", num_experts=16, expert_retrieval_heads=2, experts_per_head=2, expert_retrieval_dim=8)
STEPS, MICRO, ACCUM, SEQ, LR, SEED, CLIP = 4, 2, 2, 12, 3e-3, 7, 1.0


def micro_batches():
    """The same global batch every step, so the loss must fall as the model memorises it."""
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, MODEL["vocab_size"], (MICRO, SEQ + 1), generator=g) for _ in range(ACCUM)]
    for step in range(STEPS * ACCUM):
        ids = batch[step % ACCUM]
        yield ids[:, :-1], torch.arange(SEQ).expand(MICRO, SEQ), ids[:, 1:], torch.ones(MICRO, SEQ)


def reference_losses():
    from cheems_parallel.model import CheemsForCausalLM
    model = CheemsForCausalLM(ModelConfig(**MODEL), ParallelConfig(), init_seed=SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    batches, losses = micro_batches(), []
    for _ in range(STEPS):
        total = 0.0
        for _ in range(ACCUM):
            ids, positions, labels, mask = next(batches)
            loss = model(ids, position_ids=positions, labels=labels, loss_mask=mask).loss / ACCUM
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return losses


def _pipeline_rank(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None   # skip a ~50 s JIT build
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    from cheems_parallel.parallel import DeepSpeedMPU, initialize_parallel
    from cheems_parallel.parallel.pipeline import build_pipeline_model
    parallel = ParallelConfig(pipeline_parallel_size=2)
    initialize_parallel(parallel)
    module = build_pipeline_model(ModelConfig(**MODEL), parallel, init_seed=SEED)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM,
              "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                        "weight_decay": 0.0, "torch_adam": True}},
              "zero_optimization": {"stage": 1}, "gradient_clipping": CLIP, "steps_per_print": 10 ** 6}
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    batches = ((((ids, positions), (labels, mask))) for ids, positions, labels, mask in micro_batches())
    losses = [engine.train_batch(batches).item() for _ in range(STEPS)]
    if engine.is_last_stage():
        with open(out_path, "w") as f:
            json.dump(losses, f)


def test_two_stage_pipeline_equals_one_process(tmp_path, single_process_group):
    expected = reference_losses()
    out = tmp_path / "losses.json"
    mp.start_processes(_pipeline_rank, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn")
    got = json.loads(out.read_text())
    assert expected[-1] < expected[0]            # it trains
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: pipeline {a} vs one process {b}"
