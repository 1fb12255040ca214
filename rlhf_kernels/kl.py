"""Per-token KL penalty between the policy and the reference (SFT) model.

Math, with r = ref_logp - logp = log(pi_ref(y) / pi(y)) for tokens y sampled from the policy
(Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html):
    k1 = -r                  unbiased estimate of KL(pi || pi_ref), can be negative per token
    k2 = r^2 / 2             biased, always >= 0
    k3 = exp(r) - r - 1      unbiased, always >= 0
All three are positive on average when the policy moved away from the reference. InstructGPT's
reward uses k1 (`-beta * log(pi / pi_SFT)`); TRL's `kl_estimator` offers k1 and k3.
Gradients (d/d logp, d/d ref_logp): k1: (1, -1); k2: (-r, r); k3: (1 - exp(r), exp(r) - 1).
Shapes: logp and ref_logp of one shape (e.g. [B, T]) -> kl of that shape, fp32.
Numerics: fp32 whatever the input dtype. The same k3 sits inside the PPO loss kernel as approx_kl.
"""

import torch

from . import _checks, reference
from ._dispatch import compute_dtype, tl, triton, use_triton

# The reference: `reference.kl_penalty_reference`, also the CPU path (elementwise: no chunking).

ESTIMATORS = ("k1", "k2", "k3")


@triton.jit
def _kl_penalty_fwd_kernel(
    logp_ptr,  # [N] policy log-probs of the sampled tokens, any float dtype, contiguous
    ref_logp_ptr,  # [N] reference log-probs of the same tokens, contiguous
    kl_ptr,  # [N] fp32 out: the per-token estimate
    N,
    ESTIMATOR: tl.constexpr,  # 1, 2 or 3 for k1, k2, k3: three tiny kernels, one per estimator
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref_logp = tl.load(ref_logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    r = ref_logp - logp
    if ESTIMATOR == 1:
        kl = -r
    elif ESTIMATOR == 2:
        kl = 0.5 * r * r
    else:
        kl = tl.exp(r) - r - 1.0
    tl.store(kl_ptr + offs, kl, mask=valid)


@triton.jit
def _kl_penalty_bwd_kernel(
    logp_ptr,  # [N] as in the forward
    ref_logp_ptr,  # [N] as in the forward
    grad_kl_ptr,  # [N] upstream d loss / d kl, contiguous
    grad_logp_ptr,  # [N] out: d loss / d logp, in logp's dtype
    grad_ref_ptr,  # [N] out: d loss / d ref_logp, in ref_logp's dtype
    N,
    ESTIMATOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref_logp = tl.load(ref_logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(grad_kl_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    r = ref_logp - logp
    if ESTIMATOR == 1:
        d_r = tl.full([BLOCK], -1.0, tl.float32)
    elif ESTIMATOR == 2:
        d_r = r
    else:
        d_r = tl.exp(r) - 1.0
    # d kl / d ref_logp = d kl / d r and d kl / d logp = -d kl / d r
    tl.store(grad_logp_ptr + offs, (-g * d_r).to(grad_logp_ptr.dtype.element_ty), mask=valid)
    tl.store(grad_ref_ptr + offs, (g * d_r).to(grad_ref_ptr.dtype.element_ty), mask=valid)


# Elementwise and memory-bound: 1024 elements over 4 warps is 8 per thread, plenty for a
# streaming kernel whose inputs are [B, T] (a few MB at most).
_BLOCK = 1024
_NUM_WARPS = 4


def _kl_penalty_fwd(logp, ref_logp, estimator):
    """Launcher. logp, ref_logp [N] contiguous -> kl [N] fp32."""
    for name, t in (("logp", logp), ("ref_logp", ref_logp)):
        _checks.check_triton_dtype(name, t)
    N = logp.numel()
    kl = torch.empty(N, dtype=torch.float32, device=logp.device)  # [N]
    if N > 0:
        _kl_penalty_fwd_kernel[(triton.cdiv(N, _BLOCK),)](
            logp, ref_logp, kl, N,
            ESTIMATOR=ESTIMATORS.index(estimator) + 1, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return kl


def _kl_penalty_bwd(logp, ref_logp, grad_kl, estimator):
    """Launcher. -> (d loss / d logp, d loss / d ref_logp), [N] each in the inputs' dtypes."""
    N = logp.numel()
    grad_logp = torch.empty_like(logp)  # [N]
    grad_ref = torch.empty_like(ref_logp)  # [N]
    if N > 0:
        _kl_penalty_bwd_kernel[(triton.cdiv(N, _BLOCK),)](
            logp, ref_logp, grad_kl.contiguous(), grad_logp, grad_ref, N,
            ESTIMATOR=ESTIMATORS.index(estimator) + 1, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return grad_logp, grad_ref


class _KLPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, estimator):
        # logp, ref_logp: [N] contiguous
        ctx.save_for_backward(logp, ref_logp)
        ctx.estimator = estimator
        return _kl_penalty_fwd(logp, ref_logp, estimator)

    @staticmethod
    def backward(ctx, grad_kl):
        logp, ref_logp = ctx.saved_tensors
        grad_logp, grad_ref = _kl_penalty_bwd(logp, ref_logp, grad_kl, ctx.estimator)
        return grad_logp, grad_ref, None


def kl_penalty(logp, ref_logp, estimator="k1", backend=None):
    """Per-token KL(policy || reference) estimate from log-probs of sampled tokens.

    logp, ref_logp: same shape, any float dtype. estimator: "k1" (logp - ref_logp), "k2"
    (r^2 / 2) or "k3" (exp(r) - r - 1), r = ref_logp - logp. Returns fp32 of the same shape,
    differentiable in both inputs. backend: as in `token_logprobs`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}; got {estimator!r}")
    _checks.check_float("logp", logp)
    _checks.check_like("ref_logp", ref_logp, "logp", logp)
    if not use_triton(backend, logp):
        return reference.kl_penalty_reference(logp, ref_logp, estimator)
    kl = _KLPenaltyFunction.apply(logp.reshape(-1).contiguous(), ref_logp.reshape(-1).contiguous(), estimator)
    assert kl.dtype == compute_dtype(logp)
    return kl.view(logp.shape)
