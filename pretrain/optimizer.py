"""AdamW with decoupled weight decay on matrices only, and a step that can be skipped.

Parameter groups: every parameter with ndim >= 2 (linear and embedding matrices, expert tables,
product keys) decays; 1-D parameters (norm gains, residual scales w1/w2, A_log, dt_bias, D) do not.

Skipping a step (the trainer's non-finite guard). DeepSpeed's ZeRO and bf16 optimizers already skip
an update whose gradient norm is not finite, without calling us. Two cases remain, handled here:
  * ZeRO-0 in fp32: DeepSpeed calls this optimizer directly. We clip here (DeepSpeed's own
    `clip_grad_norm_`, tensor-parallel aware through the mpu) so the norm is known, and skip when it
    is not finite; `overflow` tells the engine the step was skipped (it then leaves the LR
    scheduler alone and counts `skipped_steps`, as for its own optimizers).
  * a non-finite loss whose gradients happen to be finite: the trainer sets `skip_next`.
And one the trainer opts into: ZeRO-1/2 in bf16 with DeepSpeed's per-tensor overflow check off (see
`pretrain.config.uses_norm_guard`). DeepSpeed then always calls us, once per parameter group, after
computing the global grad norm (all-reduced over data and model parallel ranks, so every rank decides
alike); `norm_guard` returns that norm and a non-finite one skips the step, and `overflow_target` (the
wrapper) is flagged so that the engine counts the skip and leaves the LR scheduler alone.
"""
import math

import torch
from deepspeed.runtime.utils import clip_grad_norm_


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _register_with_zero() -> None:
    """ZeRO checks the optimizer's exact type against a list (a subclass of AdamW is "untested" and
    warns on every start); GuardedAdamW keeps AdamW's param_groups/state layout, so list it as
    DeepSpeed itself does for its Muon optimizer."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
    if GuardedAdamW not in ZERO_SUPPORTED_OPTIMIZERS:
        ZERO_SUPPORTED_OPTIMIZERS.append(GuardedAdamW)


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW plus `skip_next`, and (when `clip_max_norm` is set) clipping with a finite-norm check."""

    def __init__(self, params, *, mpu=None, clip_max_norm: float | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.mpu = mpu
        self.clip_max_norm = clip_max_norm   # only for ZeRO-0 fp32, where DeepSpeed does not wrap us
        self.skip_next = False
        self.overflow = False
        self._global_grad_norm = None
        self.norm_guard = None          # callable -> DeepSpeed's global grad norm (tensor/float/None)
        self.overflow_target = None     # the ZeRO optimizer wrapping us: told of a skip, as its own check would be
        self._guarded_norm = None       # the norm object last checked, and whether it was finite:
        self._guarded_norm_finite = True  # one host read per step, not one per parameter group

    @torch.no_grad()
    def step(self, closure=None):
        self.overflow = False
        if self.clip_max_norm is not None:
            parameters = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            # max_norm=inf measures without scaling; a finite max_norm scales the grads in place.
            norm = clip_grad_norm_(parameters, max_norm=self.clip_max_norm or math.inf, mpu=self.mpu)
            self._global_grad_norm = float(norm)
            if not math.isfinite(self._global_grad_norm):
                self.overflow = True
        if self.norm_guard is not None and not self._guard_norm_is_finite():
            self.overflow = True
        if self.skip_next:
            self.overflow = True
            self.skip_next = False
        if self.overflow:
            if self.overflow_target is not None:
                # The engine reads the wrapper's flag after its step: skipped_steps, no LR scheduler step.
                self.overflow_target.overflow = True
            return None
        return super().step(closure)

    def _guard_norm_is_finite(self) -> bool:
        norm = self.norm_guard()
        if norm is None:
            return True
        if norm is not self._guarded_norm:
            self._guarded_norm, self._guarded_norm_finite = norm, math.isfinite(float(norm))
        return self._guarded_norm_finite


_register_with_zero()
