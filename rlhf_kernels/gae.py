"""Generalised advantage estimation over answer tokens, and masked whitening.

Math (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16), per sequence,
sweeping t from the last token to the first:
    delta_t = r_t + gamma * V_next - V_t
    A_t     = delta_t + gamma * lam * A_next
    R_t     = A_t + V_t                       (the value targets)
where "next" is the next *valid* position (mask True) and V_next = A_next = 0 after the last valid
token (the episode ends with the answer). Masked positions get A = R = 0 and are skipped: they
neither reset nor advance the recursion. With right padding (answer tokens then pads) this is
exactly TRL's and lm-human-preferences' GAE; with a hole inside the mask, the tokens on either side
are treated as adjacent.
whiten(x, mask): (x - mean) / sqrt(var + 1e-8) over the valid entries, with the unbiased variance
(TRL's `masked_whiten`; lm-human-preferences `utils/core.py` whiten), then 0 where mask is False;
with shift_mean=False the mean is added back (advantages keep their sign on average).
Shapes: rewards, values, mask [B, T] -> advantages, returns [B, T] fp32. InstructGPT uses
gamma = 1, lam = 0.95.
Numerics: fp32 recursion whatever the input dtype. No gradient: advantages and returns are
targets, so inputs that require grad are refused rather than silently cut from the graph.
"""

import torch

from . import _checks, reference
from ._dispatch import tl, triton, use_triton

# The reference: `reference.gae_reference` (vectorised over B, a Python loop over T), also the CPU
# path; the tests check both against a per-element Python loop in float64.


@triton.jit
def _gae_fwd_kernel(
    rewards_ptr,  # [B, T] per-token rewards, any float dtype, contiguous
    values_ptr,  # [B, T] value predictions at rollout time, any float, contiguous
    mask_ptr,  # [B, T] uint8 (a bool view): 1 = answer token
    advantages_ptr,  # [B, T] fp32 out: A_t, 0 where masked
    returns_ptr,  # [B, T] fp32 out: A_t + V_t, 0 where masked
    T,
    gamma,  # runtime fp32
    lam,  # runtime fp32
):
    # One program per sequence walks its T tokens backwards: the recursion is sequential in t and
    # the work (B * T scalars) is microseconds next to the forward passes that produced the values.
    seq = tl.program_id(0).to(tl.int64)
    base = seq * T
    next_value = 0.0
    next_adv = 0.0
    for i in range(0, T):
        t = base + (T - 1 - i)
        valid = tl.load(mask_ptr + t) != 0
        value = tl.load(values_ptr + t).to(tl.float32)
        delta = tl.load(rewards_ptr + t).to(tl.float32) + gamma * next_value - value
        adv = delta + gamma * lam * next_adv
        tl.store(advantages_ptr + t, tl.where(valid, adv, 0.0))
        tl.store(returns_ptr + t, tl.where(valid, adv + value, 0.0))
        next_value = tl.where(valid, value, next_value)
        next_adv = tl.where(valid, adv, next_adv)


def _gae_fwd(rewards, values, mask, gamma, lam):
    """Launcher. rewards, values, mask [B, T] contiguous -> advantages, returns [B, T] fp32."""
    for name, t in (("rewards", rewards), ("values", values)):
        _checks.check_triton_dtype(name, t)
    B, T = rewards.shape
    advantages = torch.empty(B, T, dtype=torch.float32, device=rewards.device)  # [B, T]
    returns = torch.empty(B, T, dtype=torch.float32, device=rewards.device)  # [B, T]
    if B * T > 0:
        # a scalar loop: one warp is all a program can use
        _gae_fwd_kernel[(B,)](rewards, values, mask.view(torch.uint8), advantages, returns, T, gamma, lam, num_warps=1)
    return advantages, returns


def gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=None):
    """Advantages and returns by GAE over [B, T] (see the module docstring).

    rewards: [B, T] float (e.g. -beta * kl_t, plus the RM score on the last answer token);
    values: [B, T] float, detached; mask: [B, T], True (or 1) on answer tokens: bool, or integer or
    floating {0, 1} (checked, one host sync). gamma: discount (InstructGPT 1.0); lam: GAE lambda
    (InstructGPT 0.95).
    Returns (advantages, returns), [B, T] fp32 each (fp64 for fp64 inputs on the torch backend),
    0 where mask is False. backend: as in `token_logprobs`.
    """
    _checks.check_float("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T]; got {_checks.shape_str(rewards)}")
    _checks.check_like("values", values, "rewards", rewards)
    mask = _checks.as_bool_mask("mask", mask, "rewards", rewards)
    for name, t in (("rewards", rewards), ("values", values)):
        _checks.check_no_grad(name, t)
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be a float in [0, 1]; got {value!r}")
    if not use_triton(backend, rewards):
        return reference.gae_reference(rewards, values, mask, gamma, lam)
    return _gae_fwd(rewards.contiguous(), values.contiguous(), mask.contiguous(), float(gamma), float(lam))


def whiten(x, mask, shift_mean=True):
    """(x - mean) / sqrt(var + 1e-8) over entries where mask is True, var unbiased; 0 elsewhere.

    x: any float shape, e.g. advantages [B, T]; mask: same shape, bool, or integer or floating
    {0, 1} (TRL's `masked_whiten` takes those). shift_mean=False adds the mean back. Returns fp32
    (fp64 for fp64 x), differentiable. With fewer than two valid entries the variance is taken as
    0 (a single valid entry whitens to 0, none gives all zeros) instead of dividing by zero.
    Torch on every backend: two reductions over B * T values, where a kernel would gain nothing.
    """
    _checks.check_float("x", x)
    mask = _checks.as_bool_mask("mask", mask, "x", x)
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    zero = torch.zeros_like(xf)
    n_valid = mask.sum()
    mean = torch.where(mask, xf, zero).sum() / n_valid.clamp(min=1)
    centered = torch.where(mask, xf - mean, zero)
    var = centered.square().sum() / (n_valid - 1).clamp(min=1)  # Bessel's correction
    whitened = centered * torch.rsqrt(var + 1e-8)  # 1e-8: TRL's masked_whiten
    if not shift_mean:
        whitened = torch.where(mask, whitened + mean, zero)
    return whitened
