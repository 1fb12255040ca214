"""The clipped PPO policy loss, fused: log-probs, loss and d loss / d logits in one kernel.

Math (Schulman et al. 2017, eq. 7, written as a loss to minimise; InstructGPT's PPO objective),
for token i with logits z_i (after the model's transform, `logit_transform.py`; the plain logits by
default), label y_i, x_i = z_i / T, p_i = softmax(x_i):
    logp_i  = x_i[y_i] - logsumexp(x_i)
    ratio_i = exp(logp_i - old_logp_i)
    l_i     = max(-A_i * ratio_i, -A_i * clip(ratio_i, 1 - eps, 1 + eps_high))
    loss    = sum_i mask_i * l_i / max(sum_i mask_i, 1)        (0, not NaN, when nothing is valid)
    d loss / d z_i = c_i * (onehot(y_i) - p_i) / T,   c_i = -A_i * ratio_i / n_valid where the
                     unclipped term is the larger (ties included), else 0 (the clip zeroes it);
                     times dz/d logits of the transform (`logit_transform.py`) when one is given
Stats (detached fp32 scalars, masked means): clip_frac = tokens where the clipped term is strictly
larger (TRL's pg_clipfrac); approx_kl = mean((ratio - 1) - log ratio), the k3 estimate of
KL(old || new) (cleanrl's approx_kl, Schulman's "Approximating KL Divergence"); entropy = mean
per-token entropy of the new policy at temperature T.
Shapes: logits [N, V] (or [..., V]); labels, old_logp, advantages, mask [N] (or [...]).
Source: TRL's PPO policy loss (trl/experimental/ppo/ppo_trainer.py, pg_losses/pg_losses2) and
Liger's loss-and-gradient-in-the-forward cross entropy (src/liger_kernel/ops/cross_entropy.py).
Numerics: as `logprobs.py` (fp32, online logsumexp, -inf safe). One program per row: pass 1
streams the row for lse, logp and entropy; pass 2 streams it again and writes the gradient, so the
backward never re-reads the logits. Masked rows are not read at all (their gradient rows are
zeroed). The second pass re-reads a row the same program has just read (a 152k bf16 row is 304 KB),
which may still sit in L2 (50 MB on an H100); only the GPU benchmark can say how often.
Where the gradient goes: by default into a fresh buffer shaped like the logits, in their dtype;
pass `grad_logits_out` to choose the buffer, e.g. `logits` itself to overwrite the logits in place
and save that memory when the caller needs the logits no more. Either way the buffer *is* the
gradient that backward passes on: as is when grad_output == 1, else scaled in place (once).
"""

import torch

from . import _checks, reference
from ._dispatch import compute_dtype, tl, triton, use_triton
from .logit_transform import softcap_grad, transformed_logits
from .logprobs import _NUM_WARPS, _block_v, _row_logsumexp

# The reference: `reference.ppo_policy_loss_naive` (autograd: log_softmax, gather, ratio, clip and
# mean as separate ops; the ground truth) and `reference.ppo_policy_loss_fwd` (chunked; CPU path).


@triton.jit
def _ppo_policy_loss_fwd_kernel(
    logits_ptr,  # [N, V] policy logits, any float dtype; row stride logits_row_stride, col stride 1
    logits_row_stride,
    labels_ptr,  # [N] int64 sampled token ids (ignored on masked rows)
    old_logp_ptr,  # [N] log-probs of the labels under the policy that sampled them, any float
    advantages_ptr,  # [N] advantages, any float
    mask_ptr,  # [N] uint8 (a bool view): 1 = the token counts
    n_valid_ptr,  # [] fp32 max(sum(mask), 1), read on the device so the host never syncs
    grad_ptr,  # [N, V] out: d loss / d logits in grad's dtype; may alias logits_ptr
    grad_row_stride,
    loss_ptr,  # [N] fp32 out: l_i (0 on masked rows); loss = sum / n_valid
    clipped_ptr,  # [N] fp32 out: 1.0 where the clipped term is strictly larger
    approx_kl_ptr,  # [N] fp32 out: (ratio - 1) - log ratio
    entropy_ptr,  # [N] fp32 out: entropy of softmax(logits / T)
    V,
    temperature,  # runtime fp32: no recompile per value
    clip_low,  # runtime fp32 eps: ratio is clipped below at 1 - clip_low
    clip_high,  # runtime fp32 eps_high: ratio is clipped above at 1 + clip_high
    logit_scale,  # runtime fp32 a of the logit transform (1.0: none)
    logit_softcap,  # runtime fp32 c of the softcap, read only if HAS_SOFTCAP
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,  # False when no gradient is needed: one pass over the logits
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at N * V > 2**31
    grad_row_ptr = grad_ptr + row * grad_row_stride
    if tl.load(mask_ptr + row) == 0:
        tl.store(loss_ptr + row, 0.0)
        tl.store(clipped_ptr + row, 0.0)
        tl.store(approx_kl_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                zeros = tl.full([BLOCK_V], 0.0, grad_ptr.dtype.element_ty)
                tl.store(grad_row_ptr + cols, zeros, mask=cols < V)
        return
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(labels_ptr + row)
    lse, target, entropy = _row_logsumexp(
        row_ptr, label, V, temperature, logit_scale, logit_softcap, HAS_SOFTCAP, True, BLOCK_V
    )
    log_ratio = (target - lse) - tl.load(old_logp_ptr + row).to(tl.float32)
    ratio = tl.exp(log_ratio)
    adv = tl.load(advantages_ptr + row).to(tl.float32)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    tl.store(loss_ptr + row, tl.maximum(unclipped, clipped))
    tl.store(clipped_ptr + row, tl.where(clipped > unclipped, 1.0, 0.0))
    tl.store(approx_kl_ptr + row, (ratio - 1.0) - log_ratio)
    tl.store(entropy_ptr + row, entropy)
    if WRITE_GRAD:
        # d loss / d logp_i, with 1 / T of d x / d z and the scalar a of the transform folded in
        coef = tl.where(unclipped >= clipped, unclipped, 0.0) / tl.load(n_valid_ptr) / temperature
        coef = coef * logit_scale
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
            x = transformed_logits(z, cols, V, logit_scale, logit_softcap, HAS_SOFTCAP) / temperature
            p = tl.exp(x - lse)
            grad = coef * (tl.where(cols == label, 1.0, 0.0) - p)
            if HAS_SOFTCAP:
                grad = grad * softcap_grad(z, logit_scale, logit_softcap)
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)


def _ppo_policy_loss_fwd(
    logits, labels, old_logp, advantages, mask, n_valid, temperature, clip_low, clip_high, grad_out,
    logit_scale=1.0, logit_softcap=None,
):  # fmt: skip
    """Launcher. logits [N, V] (column stride 1); labels, old_logp, advantages, mask [N]
    contiguous; n_valid [] fp32; grad_out [N, V] or None (no gradient).
    Returns loss_rows, clipped, approx_kl, entropy: [N] fp32 each."""
    _checks.check_triton_dtype("logits", logits)
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        _checks.check_triton_dtype(name, t)
    N, V = logits.shape
    rows = [torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(4)]  # [N] x4
    write_grad = grad_out is not None
    if N > 0:
        _ppo_policy_loss_fwd_kernel[(N,)](  # 1-D grid over rows: no 65535 limit
            logits, logits.stride(0), labels, old_logp, advantages, mask.view(torch.uint8), n_valid,
            grad_out if write_grad else logits, grad_out.stride(0) if write_grad else 0,
            *rows, V, temperature, clip_low, clip_high, logit_scale, logit_softcap or 1.0,
            HAS_SOFTCAP=logit_softcap is not None, WRITE_GRAD=write_grad, BLOCK_V=_block_v(V), num_warps=_NUM_WARPS,
        )  # fmt: skip
    return tuple(rows)


def policy_loss_rows(
    logits, labels, old_logp, advantages, mask, n_valid, temperature, clip_low, clip_high, grad_out,
    triton_path, logit_scale=1.0, logit_softcap=None,
):  # fmt: skip
    """Per-row terms on an [N, V] block with either backend (also used chunk by chunk by
    fused_linear, which passes the model's logit transform); writes the gradient of the whole loss
    into grad_out when it is given."""
    fwd = _ppo_policy_loss_fwd if triton_path else reference.ppo_policy_loss_fwd
    return fwd(
        logits, labels, old_logp, advantages, mask, n_valid, temperature, clip_low, clip_high, grad_out,
        logit_scale, logit_softcap,
    )  # fmt: skip


def scale_stored_grads_(ctx, grads, grad_output):
    """Backward of a scalar loss whose gradients the forward already computed: scale them in place
    by grad_output. Fast path (as Liger's): grad_output == 1, the plain `loss.backward()`, returns
    them untouched. In-place scaling saves a gradient-sized copy but can happen once per graph, so a
    second backward after it (retain_graph=True) raises instead of returning a twice-scaled gradient."""
    if getattr(ctx, "scaled_in_place", False):
        raise RuntimeError(
            "backward ran twice through a fused loss whose stored gradient was already scaled in "
            "place by grad_output != 1; recompute the loss instead of using retain_graph=True"
        )
    if torch.equal(grad_output, torch.ones_like(grad_output)):
        return grads
    ctx.scaled_in_place = True
    return [g.mul_(grad_output.to(g.dtype)) if g is not None else None for g in grads]


class _PPOPolicyLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, labels, old_logp, advantages, mask, n_valid, temperature, clip_low, clip_high,
        grad_out, triton_path,
    ):  # fmt: skip
        # logits [N, V]; labels, old_logp, advantages, mask [N]; grad_out [N, V] or None
        loss_rows, clipped, approx_kl, entropy = policy_loss_rows(
            logits, labels, old_logp, advantages, mask, n_valid, temperature, clip_low, clip_high,
            grad_out, triton_path,
        )  # fmt: skip
        ctx.save_for_backward(grad_out)  # the finished gradient: backward needs no logits
        ctx.mark_non_differentiable(clipped, approx_kl, entropy)
        return loss_rows.sum() / n_valid, clipped, approx_kl, entropy

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        (grad,) = scale_stored_grads_(ctx, ctx.saved_tensors, grad_loss)
        return (grad,) + (None,) * 10


def check_policy_args(
    logits_name, logits, vocab, labels, old_logp, advantages, mask, clip_eps, clip_eps_high, temperature
):
    """Shared by ppo_policy_loss and fused_linear_ppo_loss (where `logits` is the hidden [N, H]
    and `vocab` comes from the weight): shapes, dtypes, devices, constant targets, label range.
    Returns the mask as bool (`_checks.as_bool_mask`)."""
    _checks.check_labels(labels, logits, logits_name)
    _checks.check_targets("labels", labels, old_logp=old_logp, advantages=advantages)
    mask = _checks.as_bool_mask("mask", mask, "labels", labels)
    _checks.check_positive("clip_eps", clip_eps)
    if clip_eps_high is not None:
        _checks.check_positive("clip_eps_high", clip_eps_high)
    _checks.check_positive("temperature", temperature)
    _checks.check_label_range(labels, vocab, mask, "where mask is True")
    return mask


def ppo_policy_loss(
    logits, labels, old_logp, advantages, mask, clip_eps=0.2, clip_eps_high=None, temperature=1.0,
    grad_logits_out=None, backend=None,
):  # fmt: skip
    """Clipped PPO policy loss from logits, fused (see the module docstring for the math).

    logits [N, V] (or [..., V]) fp16/bf16/fp32; labels [N] int64 (the sampled tokens); old_logp,
    advantages [N] float, detached; mask [N] bool, or integer or floating {0, 1} (checked: one more
    host sync). clip_eps: eps (InstructGPT/cleanrl 0.2); clip_eps_high: upper eps (DAPO's
    clip-higher), default clip_eps. temperature: the sampling one.
    grad_logits_out: optional buffer shaped and typed like logits (contiguous) that receives
    d loss / d logits during the forward and is the gradient backward passes on; may be `logits`
    itself (in place). Untouched when no gradient is needed (no_grad, or logits need none).
    Returns (loss [] fp32, stats {"clip_frac", "approx_kl", "entropy"} detached fp32 scalars).
    A fully masked batch gives loss 0 and zero gradients. One host sync (the label check).
    """
    _checks.check_logits("logits", logits)
    V = logits.shape[-1]
    mask = check_policy_args(
        "logits", logits, V, labels, old_logp, advantages, mask, clip_eps, clip_eps_high, temperature
    )
    triton_path = use_triton(backend, logits)
    logits_2d = logits.reshape(-1, V)  # [N, V]
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    if grad_logits_out is not None and (
        list(grad_logits_out.shape) != list(logits.shape)
        or grad_logits_out.dtype != logits.dtype
        or grad_logits_out.device != logits.device
        or not grad_logits_out.is_contiguous()
    ):
        raise ValueError(
            f"grad_logits_out must be a contiguous {logits.dtype} tensor of shape {list(logits.shape)} "
            f"on {logits.device} like logits; got {grad_logits_out.dtype} {list(grad_logits_out.shape)} "
            f"on {grad_logits_out.device}"
        )
    grad_out = None  # [N, V] in the logits' dtype, or None when no gradient is needed
    if torch.is_grad_enabled() and logits.requires_grad:
        if grad_logits_out is None:
            grad_out = torch.empty_like(logits_2d)
        else:
            grad_out = grad_logits_out.detach().view(-1, V)  # shares the caller's storage
    mask_1d = mask.reshape(-1).contiguous()  # [N]
    n_valid = mask_1d.sum().clamp(min=1).to(compute_dtype(logits))  # [] stays on the device
    loss, clipped, approx_kl, entropy = _PPOPolicyLossFunction.apply(
        logits_2d, labels.reshape(-1).contiguous(), old_logp.reshape(-1).contiguous(),
        advantages.reshape(-1).contiguous(), mask_1d, n_valid, float(temperature), float(clip_eps),
        float(clip_eps if clip_eps_high is None else clip_eps_high), grad_out, triton_path,
    )  # fmt: skip
    stats = {
        "clip_frac": clipped.sum() / n_valid,
        "approx_kl": approx_kl.sum() / n_valid,
        "entropy": entropy.sum() / n_valid,
    }
    return loss, stats
