"""The clipped PPO value loss, fused: loss terms, clip flags and d loss / d values in one kernel.

Math (OpenAI baselines ppo2/model.py; TRL trl/experimental/ppo/ppo_trainer.py, vf_losses1/2):
    V_clip_i = clip(V_i, Vold_i - eps, Vold_i + eps)
    l_i      = max((V_i - R_i)^2, (V_clip_i - R_i)^2)
    loss     = 0.5 * sum_i mask_i * l_i / max(sum_i mask_i, 1)
    d loss / d V_i = (V_i - R_i) / n_valid            where the unclipped square is the larger (ties)
                   = (V_clip_i - R_i) / n_valid       where the clipped one is, and V_i is inside
                                                      [Vold_i - eps, Vold_i + eps]; else 0
clip_frac = fraction of valid tokens where the clipped square is strictly larger (TRL's vf_clipfrac).
Shapes: values, old_values, returns, mask of one shape, e.g. [B, T]. Gradients flow to `values`
only: old values and returns are targets (passing ones that require grad is an error).
Numerics: fp32 whatever the input dtype; a fully masked batch gives loss 0, not NaN.
Why a kernel for [B, T] elementwise math: torch runs it as ~12 launches with 8 temporaries; this is
one launch that also writes the gradient and per-block partial sums (reduced by one torch .sum(),
deterministic unlike atomics), and the backward is a scale of the stored gradient.
"""

import torch

from . import _checks, reference
from ._dispatch import compute_dtype, tl, triton, use_triton
from .ppo_loss import scale_stored_grads_

# The reference: `reference.ppo_value_loss_reference`, also the CPU path (autograd; no chunking
# needed for [B, T] tensors).


@triton.jit
def _ppo_value_loss_fwd_kernel(
    values_ptr,  # [N] current value predictions, any float dtype, contiguous
    old_values_ptr,  # [N] value predictions at rollout time, any float
    returns_ptr,  # [N] GAE returns (targets), any float
    mask_ptr,  # [N] uint8 (a bool view): 1 = the token counts
    n_valid_ptr,  # [] fp32 max(sum(mask), 1), read on the device: no host sync
    grad_ptr,  # [N] fp32 out: d loss / d values; written only if WRITE_GRAD
    loss_partial_ptr,  # [cdiv(N, BLOCK)] fp32 out: sum of mask * l over each block
    clipped_partial_ptr,  # [cdiv(N, BLOCK)] fp32 out: count of clipped valid tokens per block
    N,
    clip_eps,  # runtime fp32
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < N
    valid = (tl.load(mask_ptr + offs, mask=in_range, other=0) != 0) & in_range
    v = tl.load(values_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    old = tl.load(old_values_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    ret = tl.load(returns_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    v_clip = tl.minimum(tl.maximum(v, old - clip_eps), old + clip_eps)
    unclipped = (v - ret) * (v - ret)
    clipped = (v_clip - ret) * (v_clip - ret)
    use_unclipped = unclipped >= clipped
    per_token = tl.where(use_unclipped, unclipped, clipped)
    tl.store(loss_partial_ptr + block, tl.sum(tl.where(valid, per_token, 0.0)))
    tl.store(clipped_partial_ptr + block, tl.sum(tl.where(valid & (clipped > unclipped), 1.0, 0.0)))
    if WRITE_GRAD:
        # d (0.5 * square) = the residual; clamp passes the gradient only inside its bounds
        inside = (v >= old - clip_eps) & (v <= old + clip_eps)
        d_clipped = tl.where(inside, v_clip - ret, 0.0)
        grad = tl.where(use_unclipped, v - ret, d_clipped) / tl.load(n_valid_ptr)
        tl.store(grad_ptr + offs, tl.where(valid, grad, 0.0), mask=in_range)


# Elementwise over [B, T] (tens of thousands of values): 1024 per program over 4 warps keeps the
# partial-sum vector short and each thread's loads vectorised.
_BLOCK = 1024
_NUM_WARPS = 4


def _ppo_value_loss_fwd(values, old_values, returns, mask, n_valid, clip_eps, write_grad):
    """Launcher. values, old_values, returns, mask [N] contiguous; n_valid [] fp32 ->
    (loss_sum [] fp32 before the 0.5 / n_valid, clipped_count [] fp32, grad [N] fp32 or None)."""
    for name, t in (("values", values), ("old_values", old_values), ("returns", returns)):
        _checks.check_triton_dtype(name, t)
    N = values.numel()
    n_blocks = triton.cdiv(N, _BLOCK)
    loss_partial = torch.zeros(n_blocks, dtype=torch.float32, device=values.device)  # [blocks]
    clipped_partial = torch.zeros(n_blocks, dtype=torch.float32, device=values.device)  # [blocks]
    grad = torch.empty(N, dtype=torch.float32, device=values.device) if write_grad else None  # [N]
    if N > 0:
        _ppo_value_loss_fwd_kernel[(n_blocks,)](
            values, old_values, returns, mask.view(torch.uint8), n_valid,
            grad if write_grad else loss_partial, loss_partial, clipped_partial, N, clip_eps,
            WRITE_GRAD=write_grad, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return loss_partial.sum(), clipped_partial.sum(), grad


class _PPOValueLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, mask, n_valid, clip_eps, write_grad):
        # all [N] contiguous
        loss_sum, clipped_count, grad = _ppo_value_loss_fwd(
            values, old_values, returns, mask, n_valid, clip_eps, write_grad
        )
        ctx.save_for_backward(grad)
        ctx.values_dtype = values.dtype
        ctx.mark_non_differentiable(clipped_count)
        return 0.5 * loss_sum / n_valid, clipped_count

    @staticmethod
    def backward(ctx, grad_loss, unused_clip_grad):
        (grad,) = scale_stored_grads_(ctx, ctx.saved_tensors, grad_loss)  # [N] fp32 or None
        grad_values = grad.to(ctx.values_dtype) if grad is not None else None
        return grad_values, None, None, None, None, None, None


def ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2, backend=None):
    """Clipped value loss 0.5 * masked mean of max((V - R)^2, (clip(V, Vold +- eps) - R)^2).

    values: any float shape, e.g. [B, T] (the value head's output, differentiable); old_values,
    returns: same shape, detached targets; mask: same shape, bool, or integer or floating {0, 1}
    (checked: one host sync). clip_eps: InstructGPT 0.2.
    Returns (loss [] fp32, {"clip_frac": [] fp32 detached}). backend: as in `token_logprobs`.
    """
    _checks.check_float("values", values)
    _checks.check_targets("values", values, old_values=old_values, returns=returns)
    mask = _checks.as_bool_mask("mask", mask, "values", values)
    _checks.check_positive("clip_eps", clip_eps)
    if not use_triton(backend, values):
        return reference.ppo_value_loss_reference(values, old_values, returns, mask, clip_eps)
    mask_1d = mask.reshape(-1).contiguous()  # [N]
    n_valid = mask_1d.sum().clamp(min=1).to(torch.float32)  # [] on the device
    write_grad = torch.is_grad_enabled() and values.requires_grad
    loss, clipped_count = _PPOValueLossFunction.apply(
        values.reshape(-1).contiguous(), old_values.reshape(-1).contiguous(),
        returns.reshape(-1).contiguous(), mask_1d, n_valid, float(clip_eps), write_grad,
    )  # fmt: skip
    assert loss.dtype == compute_dtype(values)
    return loss, {"clip_frac": clipped_count / n_valid}
