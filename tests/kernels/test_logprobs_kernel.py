"""token_logprobs: the Triton kernel and the chunked torch path against the naive formula."""

import inspect
import math

import pytest
import torch

from rlhf_kernels import token_logprobs
from rlhf_kernels.logprobs import _token_logprobs_fwd_kernel
from rlhf_kernels.reference import token_logprobs_naive

# Forward: both sides upcast the same input values to fp32, so every dtype differs only by fp32
# summation order. Gradients come back in the input dtype: one rounding in it (bf16 keeps 8 bits,
# so a value near 1 may land one ulp, 2**-8, apart).
FWD_TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-5, rtol=1e-5),
}
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=4e-3, rtol=1e-2),
    torch.float16: dict(atol=5e-4, rtol=1e-3),
}
BACKENDS = ("triton", "torch")
DTYPES = tuple(FWD_TOL)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's exp(-inf) notes, interpreter


def _compare(logits, labels, backend, temperature=1.0, grad_logp=None, grad_entropy=None, fwd_tol=None):
    """Run ours and the naive formula on the same leaf logits; compare logp, entropy, d logits."""
    dtype = logits.dtype
    g_logp = torch.randn(labels.shape) if grad_logp is None else grad_logp
    g_ent = torch.zeros(labels.shape) if grad_entropy is None else grad_entropy
    results = []
    for fn in (lambda x: token_logprobs(x, labels, temperature, return_entropy=True, backend=backend),
               lambda x: token_logprobs_naive(x, labels, temperature, return_entropy=True)):
        x = logits.detach().clone().requires_grad_()
        logp, entropy = fn(x)
        (logp * g_logp + entropy * g_ent).sum().backward()
        results.append((logp, entropy, x.grad))
    (logp, entropy, grad), (logp_ref, entropy_ref, grad_ref) = results
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert grad.dtype == dtype
    torch.testing.assert_close(logp, logp_ref, **(fwd_tol or FWD_TOL[dtype]))
    torch.testing.assert_close(entropy, entropy_ref, **(fwd_tol or FWD_TOL[dtype]))
    torch.testing.assert_close(grad, grad_ref, **GRAD_TOL[dtype])
    return logp, entropy, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1000, 32003])
def test_matches_naive_forward_and_backward(backend, dtype, V):
    N = 6 if V == 1000 else 3
    logits = (torch.randn(N, V) * 3).to(dtype)
    labels = torch.randint(0, V, (N,))
    labels[1] = -100  # an ignored row
    g = torch.randn(N)
    g_h = torch.randn(N)
    # temperature != 1 and an entropy gradient: every term of the backward kernel
    logp, entropy, grad = _compare(logits, labels, backend, 0.7, g, g_h)
    assert logp[1] == 0 and entropy[1] == 0 and not grad[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen_vocab_few_rows(backend):
    V = 151936  # Qwen2's vocabulary: 37.1 blocks of 4096
    logits = torch.randn(2, V).to(torch.bfloat16)
    labels = torch.tensor([5, V - 1])
    _compare(logits, labels, backend, 1.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_and_masked_logits(backend):
    V = 10000
    logits = torch.randn(4, V)
    logits[0, 17] = 1e4  # one huge logit: p = 1 there, exp(x - m) must not overflow
    logits[1, :] = -1e4
    logits[1, 3] = 1e4
    logits[2, 9000:] = float("-inf")  # -inf padding columns (a vocab padded past the tokenizer)
    logits[3, :8192] = float("-inf")  # two whole 4096-blocks of -inf before any finite logit
    labels = torch.tensor([17, 4, 100, 9000])
    # logits of 1e4: logp = x - lse where both are ~1e4, so fp32 keeps ~1e-3 absolute
    logp, entropy, grad = _compare(logits, labels, backend, 1.0, fwd_tol=dict(atol=2e-3, rtol=1e-5))
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    assert logp[0].abs() < 1e-3 and entropy[0].abs() < 1e-3  # the 1e4 logit takes all the mass
    assert logp[1] < -1e4  # exp(-2e4) is 0 in fp32; logp is still the exact -2e4
    assert not grad[2, 9000:].any() and not grad[3, :8192].any()  # p = 0 on -inf columns


def test_worked_by_hand():
    # logits [0, ln 3] at T = 1: p = [1/4, 3/4]; label 1 -> logp = ln(3/4) = -0.28768
    # entropy = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.34657 + 0.21576 = 0.56233
    # d logp / d z = onehot - p = [-1/4, 1/4]
    # Same probabilities at T = 2 from logits [0, 2 ln 3]: the gradient halves, [-1/8, 1/8].
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 2 * math.log(3)]], requires_grad=True)
    temperature_rows = []
    for row, temperature in ((0, 1.0), (1, 2.0)):
        logp, entropy = token_logprobs(logits[row : row + 1], torch.tensor([1]), temperature,
                                       return_entropy=True, backend="triton")
        logp.sum().backward()
        temperature_rows.append((logp.item(), entropy.item()))
    for logp, entropy in temperature_rows:
        assert logp == pytest.approx(math.log(0.75), abs=1e-6)
        assert entropy == pytest.approx(0.5623351, abs=1e-6)
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.25, 0.25], [-0.125, 0.125]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_and_empty(backend):
    logits = torch.randn(3, 50, requires_grad=True)
    logp = token_logprobs(logits, torch.full((3,), -100), backend=backend)
    logp.sum().backward()
    assert not logp.any() and not logits.grad.any()
    empty = token_logprobs(torch.randn(0, 50), torch.zeros(0, dtype=torch.int64), backend=backend)
    assert empty.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_one_sided_backward(backend):
    # [B, T, V] logits with [B, T] labels; backward through the entropy alone, then logp alone
    logits = torch.randn(2, 3, 40, requires_grad=True)
    labels = torch.randint(0, 40, (2, 3))
    logp, entropy = token_logprobs(logits, labels, return_entropy=True, backend=backend)
    assert logp.shape == (2, 3) and entropy.shape == (2, 3)
    entropy.sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    token_logprobs_naive(logits, labels, return_entropy=True)[1].sum().backward()
    torch.testing.assert_close(ours, logits.grad, **GRAD_TOL[torch.float32])
    logits.grad = None
    token_logprobs(logits, labels, return_entropy=True, backend=backend)[0].sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    token_logprobs_naive(logits, labels).sum().backward()
    torch.testing.assert_close(ours, logits.grad, **GRAD_TOL[torch.float32])


def test_temperature_is_a_runtime_argument():
    # a constexpr would compile one kernel per temperature value
    params = inspect.signature(_token_logprobs_fwd_kernel.fn).parameters
    assert params["temperature"].annotation is inspect.Parameter.empty
    assert "constexpr" in str(params["BLOCK_V"].annotation)


def test_errors_name_the_argument():
    logits = torch.randn(4, 7)
    with pytest.raises(ValueError, match=r"labels must be \[4\] int64 to match logits \[4, 7\]; got \[4, 7\]"):
        token_logprobs(logits, torch.zeros(4, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must be \[4\] int64 .* got \[4\] torch.int32"):
        token_logprobs(logits, torch.zeros(4, dtype=torch.int32))
    message = r"labels must lie in \[0, V=7\) or equal ignore_index=-100; found 7 at flat row 2"
    with pytest.raises(ValueError, match=message):
        token_logprobs(logits, torch.tensor([0, 1, 7, -100]))
    with pytest.raises(ValueError, match="temperature must be a positive float; got 0"):
        token_logprobs(logits, torch.zeros(4, dtype=torch.int64), temperature=0)
    with pytest.raises(TypeError, match="logits must be float16, bfloat16, float32 or float64; got torch.int64"):
        token_logprobs(torch.zeros(4, 7, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits must be float16, bfloat16 or float32 for backend='triton'"):
        token_logprobs(logits.double(), torch.zeros(4, dtype=torch.int64), backend="triton")
