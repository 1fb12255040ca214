"""Per-token log-probabilities (and entropy) from logits, without an fp32 [N, V] tensor.

Math, with z the logits of one row after the model's own transform (`logit_transform.py`: z = a *
logits, softcapped as c * tanh(z / c) when a softcap c is given; z = logits by default), T the
sampling temperature, x = z / T, p = softmax(x) and y the label:
    lse    = log sum_j exp(x_j)
    logp   = x_y - lse                                   (0 where y == ignore_index)
    H      = lse - sum_j p_j x_j = -sum_j p_j log p_j
    d logp / d z_j = (onehot(y)_j - p_j) / T
    d H    / d z_j = -p_j (log p_j + H) / T
    d / d logits_j = d / d z_j * a (1 - tanh^2(a logits_j / c))    (* a alone without softcap)
Shapes: logits [N, V] (or [..., V], flattened to rows), labels [N] int64 -> logp [N] fp32.
Source: the gather of TRL's `selective_log_softmax` (trl/trainer/utils.py) and the
online softmax of Liger's cross entropy (src/liger_kernel/ops/cross_entropy.py at ead96b6).
Numerics: one program per row streams the vocab in BLOCK_V blocks keeping an online logsumexp
(running max m, s = sum exp(x - m)) in fp32 whatever the logits' dtype. The entropy rides the same
pass as t = sum exp(x - m) (x - m), re-based when m grows, so H = log s - t / s has no
cancellation even for logits of 1e4. -inf logits (masked vocab) give exp(-inf) = 0; while every
logit seen so far is -inf the running max is -inf and nothing is rescaled, so whole blocks of -inf
stay finite. The backward re-reads the logits and recomputes p from the saved lse ([N] fp32):
softmax is never stored. Temperature is a runtime fp32 argument: a new value does not recompile.
"""

import torch

from . import _checks, reference
from ._dispatch import compute_dtype, tl, triton, use_triton
from .logit_transform import softcap_grad, transformed_logits

# The reference: `reference.token_logprobs_naive` (autograd; the ground truth of the tests) and
# `reference.token_logprobs_fwd` / `reference.token_logprobs_bwd` (chunked; the CPU path).


@triton.jit
def _row_logsumexp(
    row_ptr,  # [V] one row of logits, any float dtype, column stride 1
    label,  # int64 column whose x is returned as `target`
    V,
    temperature,
    logit_scale,  # runtime fp32: the model's logit transform (logit_transform.py)
    logit_softcap,  # runtime fp32, read only if HAS_SOFTCAP
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One streaming pass over a row: returns (lse, x[label], entropy) of x = z / T, in fp32, z the
    transformed logits. The entropy is 0.0 unless HAS_ENTROPY. Shared with the PPO loss kernel."""
    m = float("-inf")  # running max of x
    s = 0.0  # sum exp(x - m)
    t = 0.0  # sum exp(x - m) * (x - m), for the entropy
    target = 0.0  # x[label]
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
        x = transformed_logits(z, cols, V, logit_scale, logit_softcap, HAS_SOFTCAP) / temperature
        target += tl.sum(tl.where(cols == label, x, 0.0))
        m_new = tl.maximum(m, tl.max(x, 0))
        # while m_new is -inf every x so far is -inf: shift by 0 so exp gives 0, not exp(NaN)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_shift)  # rescales the old sums; 0 while m is -inf (the sums are 0)
        e = tl.exp(x - m_shift)
        if HAS_ENTROPY:
            # re-base t from m to m_new: each old unit of mass gains (m - m_new)
            old_shift = tl.where(m == float("-inf"), 0.0, m - m_shift)
            x_rel = tl.where(x == float("-inf"), 0.0, x - m_shift)  # keeps 0 * -inf out
            t = alpha * (t + old_shift * s) + tl.sum(e * x_rel)
        s = s * alpha + tl.sum(e)
        m = m_new
    return m + tl.log(s), target, tl.log(s) - t / s


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,  # [N, V] logits, any float dtype; row stride logits_row_stride, column stride 1
    logits_row_stride,
    labels_ptr,  # [N] int64 token ids; rows equal to ignore_index are skipped
    logp_ptr,  # [N] fp32 out: log p(label), 0 on ignored rows
    lse_ptr,  # [N] fp32 out: logsumexp(logits / T), saved for the backward; 0 on ignored rows
    entropy_ptr,  # [N] fp32 out: entropy of softmax(logits / T); touched only if HAS_ENTROPY
    V,
    temperature,  # runtime fp32, not a constexpr: one compiled kernel serves every temperature
    ignore_index,
    logit_scale,  # runtime fp32 a of the logit transform (1.0: none)
    logit_softcap,  # runtime fp32 c of the softcap, read only if HAS_SOFTCAP
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # int64 before the stride multiply: row * V overflows int32 past 2**31 elements (8k x 262k)
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * logits_row_stride
    lse, target, entropy = _row_logsumexp(
        row_ptr, label, V, temperature, logit_scale, logit_softcap, HAS_SOFTCAP, HAS_ENTROPY, BLOCK_V
    )
    tl.store(logp_ptr + row, target - lse)
    tl.store(lse_ptr + row, lse)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,  # [N, V] the forward's logits; row stride logits_row_stride, column stride 1
    logits_row_stride,
    labels_ptr,  # [N] int64 token ids
    lse_ptr,  # [N] fp32 saved by the forward
    entropy_ptr,  # [N] fp32 saved by the forward; read only if HAS_ENTROPY_GRAD
    grad_logp_ptr,  # [N] upstream d loss / d logp, any float dtype, contiguous
    grad_entropy_ptr,  # [N] upstream d loss / d entropy, contiguous; read only if HAS_ENTROPY_GRAD
    grad_logits_ptr,  # [N, V] out: d loss / d logits in the logits' dtype; may alias logits_ptr
    grad_row_stride,
    V,
    temperature,
    ignore_index,
    logit_scale,  # runtime fp32 a of the logit transform (1.0: none)
    logit_softcap,  # runtime fp32 c of the softcap, read only if HAS_SOFTCAP
    HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    row_ptr = logits_ptr + row * logits_row_stride
    grad_row_ptr = grad_logits_ptr + row * grad_row_stride
    out_dtype = grad_logits_ptr.dtype.element_ty
    if label == ignore_index:
        # the output buffer is torch.empty: ignored rows must be written too
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row_ptr + cols, tl.full([BLOCK_V], 0.0, out_dtype), mask=cols < V)
        return
    lse = tl.load(lse_ptr + row)
    # dx/dz = 1 / T and the scalar part a of dz/d logits, folded into the row's coefficients
    g = tl.load(grad_logp_ptr + row).to(tl.float32) / temperature * logit_scale
    if HAS_ENTROPY_GRAD:
        g_h = tl.load(grad_entropy_ptr + row).to(tl.float32) / temperature * logit_scale
        h = tl.load(entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
        logp = transformed_logits(z, cols, V, logit_scale, logit_softcap, HAS_SOFTCAP) / temperature - lse
        p = tl.exp(logp)  # 0 on -inf logits
        grad = g * (tl.where(cols == label, 1.0, 0.0) - p)
        if HAS_ENTROPY_GRAD:
            grad += g_h * tl.where(p > 0.0, -p * (logp + h), 0.0)
        if HAS_SOFTCAP:
            grad = grad * softcap_grad(z, logit_scale, logit_softcap)
        tl.store(grad_row_ptr + cols, grad.to(out_dtype), mask=cols < V)


def _block_v(V: int) -> int:
    # One program per row streams its vocab. 4096 fp32 values over 8 warps is 16 per thread: big
    # loads keep enough bytes in flight for HBM, and since the online logsumexp never holds a whole
    # row (unlike Liger's single-block kernels, capped at MAX_FUSED_SIZE = 32768) more would only
    # add registers. Small V gets one block.
    return min(4096, triton.next_power_of_2(V))


_NUM_WARPS = 8


def _token_logprobs_fwd(
    logits, labels, temperature, ignore_index, with_entropy, logit_scale=1.0, logit_softcap=None
):
    """Launcher. logits [N, V] (column stride 1), labels [N] int64 ->
    logp [N], lse [N], entropy [N] or None, all fp32."""
    _checks.check_triton_dtype("logits", logits)
    assert logits.stride(-1) == 1 and labels.is_contiguous()
    N, V = logits.shape
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)  # [N]
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)  # [N]
    entropy = torch.empty(N, dtype=torch.float32, device=logits.device) if with_entropy else None
    if N > 0:
        # 1-D grid over rows: dimension 0 takes up to 2**31 - 1 programs (dims 1, 2 stop at 65535)
        _token_logprobs_fwd_kernel[(N,)](
            logits, logits.stride(0), labels, logp, lse, entropy if with_entropy else logp,
            V, temperature, ignore_index, logit_scale, logit_softcap or 1.0,
            HAS_SOFTCAP=logit_softcap is not None, HAS_ENTROPY=with_entropy, BLOCK_V=_block_v(V),
            num_warps=_NUM_WARPS,
        )  # fmt: skip
    return logp, lse, entropy


def _token_logprobs_bwd(
    logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, grad_out,
    logit_scale=1.0, logit_softcap=None,
):  # fmt: skip
    """Launcher. Writes d loss / d logits [N, V] into grad_out (may be logits itself)."""
    N, V = logits.shape
    assert grad_out.shape == logits.shape and grad_out.stride(-1) == 1
    has_entropy_grad = grad_entropy is not None
    grad_logp = grad_logp.contiguous()  # the grad of a .sum() arrives expanded, with stride 0
    grad_entropy = grad_entropy.contiguous() if has_entropy_grad else grad_logp
    if N > 0:
        _token_logprobs_bwd_kernel[(N,)](
            logits, logits.stride(0), labels, lse, entropy if has_entropy_grad else lse,
            grad_logp, grad_entropy, grad_out, grad_out.stride(0),
            V, temperature, ignore_index, logit_scale, logit_softcap or 1.0,
            HAS_SOFTCAP=logit_softcap is not None, HAS_ENTROPY_GRAD=has_entropy_grad,
            BLOCK_V=_block_v(V), num_warps=_NUM_WARPS,
        )  # fmt: skip


def logprobs_fwd(
    logits, labels, temperature, ignore_index, with_entropy, triton_path, logit_scale=1.0,
    logit_softcap=None,
):  # fmt: skip
    """Forward on an [N, V] block with either backend (also used chunk by chunk by fused_linear,
    which passes the model's logit transform). -> logp [N], lse [N] to save for the backward (None
    from the torch path), entropy [N] or None."""
    fwd = _token_logprobs_fwd if triton_path else reference.token_logprobs_fwd
    return fwd(logits, labels, temperature, ignore_index, with_entropy, logit_scale, logit_softcap)


def logprobs_bwd(
    logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, grad_out,
    triton_path, logit_scale=1.0, logit_softcap=None,
):  # fmt: skip
    """Backward on an [N, V] block with either backend; grad_logp None means zeros. lse is the
    forward's (None from the torch path, which recomputes the softmax)."""
    if grad_logp is None:
        grad_logp = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    args = (grad_logp, grad_entropy, temperature, ignore_index, grad_out, logit_scale, logit_softcap)
    if triton_path:
        _token_logprobs_bwd(logits, labels, lse, entropy, *args)
    else:
        reference.token_logprobs_bwd(logits, labels, entropy, *args)


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy, triton_path):
        # logits [N, V] with column stride 1, labels [N]
        logp, lse, entropy = logprobs_fwd(
            logits, labels, temperature, ignore_index, return_entropy, triton_path
        )
        # saves the logits by reference (no copy) and at most two [N] fp32 vectors, never the softmax
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.triton_path = temperature, ignore_index, triton_path
        ctx.set_materialize_grads(False)  # an unused entropy arrives as None: skip its term
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # [N, V], every row written by the backward
        logprobs_bwd(
            logits, labels, lse, entropy, grad_logp, grad_entropy,
            ctx.temperature, ctx.ignore_index, grad_logits, ctx.triton_path,
        )  # fmt: skip
        return grad_logits, None, None, None, None, None


def token_logprobs(
    logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False, backend=None
):
    """log softmax(logits / temperature)[labels] per row, in fp32, without an fp32 [N, V] tensor.

    logits: [N, V] (or [..., V]) fp16/bf16/fp32 (fp64 on the torch backend); labels: matching
    [N] (or [...]) int64, `ignore_index` marks rows to skip (their logp, entropy and gradient are 0).
    temperature: the one used to sample (a mismatch biases the KL estimate negative).
    Returns logp [N] fp32, or (logp, entropy) with return_entropy, both differentiable.
    backend: None (env RLHF_KERNELS_BACKEND, default auto) | "auto" | "triton" | "torch".
    Checks that every counted label lies in [0, V): one host sync.
    A [..., V] input that is not viewable as [N, V] (a strided slice) is copied first.
    """
    _checks.check_logits("logits", logits)
    _checks.check_labels(labels, logits)
    _checks.check_positive("temperature", temperature)
    V = logits.shape[-1]
    _checks.check_label_range(labels, V, labels != ignore_index, f"or equal ignore_index={ignore_index}")
    triton_path = use_triton(backend, logits)
    logits_2d = logits.reshape(-1, V)  # [N, V]
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    logp, entropy = _TokenLogprobsFunction.apply(
        logits_2d, labels.reshape(-1).contiguous(), float(temperature), int(ignore_index),
        bool(return_entropy), triton_path,
    )  # fmt: skip
    assert logp.dtype == compute_dtype(logits)
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, entropy.view(labels.shape)
    return logp
