"""The model's own transform of its LM-head logits, applied by the kernels before the softmax.

Math, with y = hidden @ W^T (+ b) the raw logits of one row, a = logit_scale, c = logit_softcap:
    z = a * y
    z = c * tanh(z / c)                      only when c is given
then x = z / T and the log-softmax, as in `logprobs.py`. The chain rule adds, per column,
    dz/dy = a * (1 - tanh^2(a * y / c))      with the softcap,   a   without.
Which model uses what (transformers' *ForCausalLM.forward): Gemma 2 softcaps with
`final_logit_softcapping` (c = 30; logits / c, tanh, * c); Cohere multiplies by `logit_scale`
(a = logit_scale); Granite divides by `logits_scaling` (a = 1 / logits_scaling).
Numerics: the transform runs in fp32 after the load (fp64 on the torch path for fp64 inputs), never
in the logits' storage dtype. The defaults (a = 1, no softcap) change no bit: 1.0 * y is y exactly,
and the softcap code is compiled out of the kernels (a constexpr) and skipped on the torch path.
With a softcap every finite or -inf logit lands in [-c, c], so -inf (a masked vocab entry) becomes
-c as in the model's forward, and the kernels re-mask the padding columns past V (loaded as -inf)
after the transform: they must not count as exp(-c) of probability mass.
tanh in the kernels: Triton's libdevice tanh does not run under the interpreter the tests use, so
tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|), exact in the limits (e -> 0 gives +-1), and
u (1 - u^2/3 + 2 u^4/15) below |u| = 0.05, where 1 - e would cancel (the next Taylor term is 6e-11
relative there). The derivative 1 - tanh^2 = 4e / (1 + e)^2 is computed from e, not from tanh,
so it keeps its relative accuracy where tanh saturates.
"""

import torch

from . import _checks
from ._dispatch import tl, triton


def check_transform(logit_scale, logit_softcap) -> tuple:
    """Validates the two arguments; returns them as (float, float or None) for the kernels."""
    _checks.check_positive("logit_scale", logit_scale)
    if logit_softcap is not None:
        _checks.check_positive("logit_softcap", logit_softcap)
        logit_softcap = float(logit_softcap)
    return float(logit_scale), logit_softcap


# ----------------------------------------------------------------------------------------------
# torch (the reference and the CPU path)
# ----------------------------------------------------------------------------------------------


def transform_logits(y: torch.Tensor, logit_scale=1.0, logit_softcap=None) -> torch.Tensor:
    """z = a * y, then c * tanh(z / c) with a softcap; y [..., V] in its own dtype (cast first for
    fp32 math). Returns y itself (no copy) at the defaults. Differentiable (autograd): it is also
    the reference the tests compare with."""
    if logit_scale != 1.0:
        y = y * logit_scale
    if logit_softcap is not None:
        y = torch.tanh(y / logit_softcap) * logit_softcap
    return y


def chain_transform_grad_(grad: torch.Tensor, y: torch.Tensor, logit_scale=1.0, logit_softcap=None):
    """grad [C, V] holds d loss / dz; multiplies it in place by dz/dy = a (1 - tanh^2(a y / c)) so
    that it holds d loss / dy. y [C, V] the raw logits, in grad's dtype. Nothing at the defaults."""
    if logit_softcap is not None:
        t = torch.tanh(y * (logit_scale / logit_softcap))  # [C, V]
        grad.mul_(t.mul_(t).neg_().add_(1.0))
    if logit_scale != 1.0:
        grad.mul_(logit_scale)
    return grad


# ----------------------------------------------------------------------------------------------
# Triton (shared by the log-prob and PPO-loss kernels)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(u):
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)  # 0 for |u| > ~44: tanh is then exactly +-1
    t = (1.0 - e) / (1.0 + e)
    u2 = u * u
    t = tl.where(a < 0.05, a * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0))), t)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def transformed_logits(
    z,  # [BLOCK_V] raw logits as loaded (any float dtype); columns >= V loaded as -inf
    cols,  # [BLOCK_V] column indices
    V,
    logit_scale,  # runtime fp32 a
    logit_softcap,  # runtime fp32 c, read only if HAS_SOFTCAP
    HAS_SOFTCAP: tl.constexpr,
):
    """fp32 a * z, softcapped when HAS_SOFTCAP; columns past V stay -inf."""
    y = z.to(tl.float32) * logit_scale
    if HAS_SOFTCAP:
        y = tl.where(cols < V, logit_softcap * _tanh(y / logit_softcap), float("-inf"))
    return y


@triton.jit
def softcap_grad(z, logit_scale, logit_softcap):
    """1 - tanh^2(a z / c) per column, = 4e / (1 + e)^2 with e = exp(-2 |a z / c|); -inf gives 0.
    The factor a of dz/dy is left to the caller (a scalar it folds into its row coefficient)."""
    e = tl.exp(-2.0 * tl.abs(z.to(tl.float32) * logit_scale / logit_softcap))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))
