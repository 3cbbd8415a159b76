"""Pipeline-parallel glue for the trainer: DeepSpeed's PipelineEngine runs forward, backward and the
optimizer step of a whole global batch in `train_batch`, fed by an iterator of micro-batches shaped as
the pipeline's first stage and loss expect: ((input_ids, position_ids[, segment_ids]), (labels, loss_mask)).

What the pipeline does not give the trainer: per-micro-batch losses before the update (a non-finite loss
cannot skip the update here; DeepSpeed's ZeRO optimizer still skips non-finite gradient norms) and CDMoE
expert-usage metrics (only the hidden state travels between stages).
"""
from __future__ import annotations

import torch


def pipeline_micro_batches(loader_iterator, device: torch.device):
    """Adapt the trainer's dict micro-batches to the pipeline's (inputs, labels) tuples."""
    for micro_batch in loader_iterator:
        inputs = [micro_batch["tokens"], micro_batch["position_ids"]]
        if "segment_ids" in micro_batch:
            inputs.append(micro_batch["segment_ids"])
        yield (tuple(t.to(device) for t in inputs),
               (micro_batch["labels"].to(device), micro_batch["loss_mask"].to(device)))


def build_pipeline_engine(config, optimizer, scheduler, ds_config):
    """The PipelineModule of config.model on this rank's stage, wrapped in DeepSpeed's PipelineEngine."""
    import deepspeed

    from cheems_parallel.parallel.pipeline import build_pipeline_model

    module = build_pipeline_model(config.model, config.parallel, init_seed=config.train.seed,
                                  activation_checkpoint_interval=int(config.train.activation_checkpointing))
    # The engine takes its process groups from the module's topology (same order as megatron-core's).
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer(module),
                                                   lr_scheduler=scheduler, config=ds_config,
                                                   dist_init_required=False)
    return engine, scheduler
