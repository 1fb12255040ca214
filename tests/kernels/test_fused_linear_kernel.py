"""fused_linear_token_logprobs / fused_linear_ppo_loss against the unfused composition
(F.linear then the naive formula), including the weight and bias gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_kernels import fused_linear_ppo_loss, fused_linear_token_logprobs
from rlhf_kernels import fused_linear
from rlhf_kernels.reference import ppo_policy_loss_naive, token_logprobs_naive

# fp32: both sides multiply in fp32; only the GEMM's summation order differs (chunks of rows).
# bf16/fp16: each side rounds its logits to the input dtype after a GEMM whose blocking depends on
# the row count, so logits may differ by an ulp (2**-8 relative in bf16: ~0.03 at |logit| ~ 8),
# which moves logp by as much; gradients are rounded to the dtype and summed over V or N.
FWD_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.bfloat16: dict(atol=6e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-3),
}
GRAD_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=6e-2, rtol=5e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}
BACKENDS = ("triton", "torch")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's exp(-inf) notes, interpreter


def _params(N, H, V, dtype, with_bias, weight_grad):
    hidden = torch.randn(N, H).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) / H**0.5).to(dtype).requires_grad_(weight_grad)
    bias = (0.1 * torch.randn(V)).to(dtype).requires_grad_(weight_grad) if with_bias else None
    return hidden, weight, bias


def _grads(tensors):
    grads = [t.grad.clone() if t is not None and t.grad is not None else None for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return grads


def _assert_grads(ours, expected, dtype):
    for g, g_ref in zip(ours, expected):
        assert (g is None) == (g_ref is None)
        if g is not None:
            assert g.dtype == dtype
            torch.testing.assert_close(g, g_ref, **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", tuple(FWD_TOL))
@pytest.mark.parametrize("with_bias, weight_grad", [(False, False), (True, True)])
def test_token_logprobs_match_unfused(backend, dtype, with_bias, weight_grad):
    N, H, V = 12, 64, 1000
    hidden, weight, bias = _params(N, H, V, dtype, with_bias, weight_grad)
    labels = torch.randint(0, V, (N,))
    labels[[2, 7]] = -100
    g_logp, g_ent = torch.randn(N), torch.randn(N)
    leaves = (hidden, weight, bias)
    logp, entropy = fused_linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=0.9,
                                                return_entropy=True, chunk_size=4, backend=backend)
    (logp * g_logp + entropy * g_ent).sum().backward()
    ours = _grads(leaves)
    logp_ref, entropy_ref = token_logprobs_naive(F.linear(hidden, weight, bias), labels, 0.9, return_entropy=True)
    (logp_ref * g_logp + entropy_ref * g_ent).sum().backward()
    expected = _grads(leaves)
    assert logp.dtype == torch.float32 and logp[2] == 0 and entropy[7] == 0
    torch.testing.assert_close(logp, logp_ref, **FWD_TOL[dtype])
    torch.testing.assert_close(entropy, entropy_ref, **FWD_TOL[dtype])
    _assert_grads(ours, expected, dtype)
    assert not ours[0][[2, 7]].any()  # ignored rows get no hidden gradient
    if weight_grad:  # a trainable head gets its gradient, never silently dropped
        assert ours[1] is not None and ours[1].abs().sum() > 0 and ours[2] is not None
    else:
        assert weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_odd_vocab_leading_dims_default_chunk(backend):
    # V = 32003 (not a multiple of any block), hidden [B, T, H], the derived chunk size
    hidden, weight, _ = _params(6, 32, 32003, torch.float32, False, True)
    hidden_3d = hidden.detach().view(2, 3, 32).requires_grad_()
    labels = torch.randint(0, 32003, (2, 3))
    logp = fused_linear_token_logprobs(hidden_3d, weight, labels, backend=backend)
    assert logp.shape == (2, 3)
    logp.sum().backward()
    ours = _grads((hidden_3d, weight))
    logp_ref = token_logprobs_naive(F.linear(hidden_3d, weight), labels)
    logp_ref.sum().backward()
    torch.testing.assert_close(logp, logp_ref, **FWD_TOL[torch.float32])
    _assert_grads(ours, _grads((hidden_3d, weight)), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias, weight_grad", [(False, False), (True, True)])
@pytest.mark.parametrize("scale", [1.0, 2.0])  # 2.0: grad_output != 1 scales the stored gradients
def test_ppo_loss_matches_unfused(backend, dtype, with_bias, weight_grad, scale):
    N, H, V = 12, 64, 1000
    hidden, weight, bias = _params(N, H, V, dtype, with_bias, weight_grad)
    labels = torch.randint(0, V, (N,))
    mask = torch.arange(N) % 3 != 0
    labels[~mask] = -100  # padding labels on masked rows must not matter
    with torch.no_grad():
        logp = token_logprobs_naive(F.linear(hidden, weight, bias), labels)
    old_logp = logp + torch.linspace(-2, 2, N)  # ratios e^-2 .. e^2: clipped and unclipped tokens
    advantages = torch.tensor([1.0, -1.0]).repeat(N // 2)
    leaves = (hidden, weight, bias)
    loss, stats = fused_linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, bias=bias,
                                        temperature=1.0, chunk_size=3, backend=backend)
    (scale * loss).backward()
    ours = _grads(leaves)
    loss_ref, stats_ref = ppo_policy_loss_naive(F.linear(hidden, weight, bias), labels, old_logp, advantages, mask)
    (scale * loss_ref).backward()
    expected = _grads(leaves)
    torch.testing.assert_close(loss, loss_ref, **FWD_TOL[dtype])
    for key in ("clip_frac", "approx_kl", "entropy"):
        assert not stats[key].requires_grad
        torch.testing.assert_close(stats[key], stats_ref[key], **FWD_TOL[dtype])
    _assert_grads(ours, expected, dtype)
    if not weight_grad:
        assert weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_counted_rows(backend):
    hidden, weight, bias = _params(4, 8, 50, torch.float32, True, True)
    logp = fused_linear_token_logprobs(hidden, weight, torch.full((4,), -100), bias=bias, backend=backend)
    logp.sum().backward()
    assert not logp.any() and not hidden.grad.any() and not weight.grad.any() and not bias.grad.any()
    _grads((hidden, weight, bias))
    loss, stats = fused_linear_ppo_loss(hidden, weight, torch.full((4,), -100), torch.zeros(4), torch.ones(4),
                                        torch.zeros(4, dtype=torch.bool), bias=bias, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and stats["entropy"].item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any() and not bias.grad.any()
    empty = fused_linear_token_logprobs(torch.randn(0, 8), weight, torch.zeros(0, dtype=torch.int64), backend=backend)
    assert empty.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_head_in_the_autocast_dtype(backend):
    # fp32 hidden and weight under bf16 autocast (the trainers' GPU mode, here on CPU): the head
    # runs in bf16 as F.linear would, and the gradients come back in fp32 through the casts
    hidden, weight, bias = _params(8, 16, 300, torch.float32, True, True)
    labels = torch.randint(0, 300, (8,))
    mask = torch.arange(8) % 4 != 0
    leaves = (hidden, weight, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fused_linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend)
        loss, _ = fused_linear_ppo_loss(hidden, weight, labels, logp.detach() + 0.1, torch.ones(8), mask,
                                        bias=bias, backend=backend)
        (logp.sum() + loss).backward()
        ours = _grads(leaves)
        logits_ref = F.linear(hidden, weight, bias)
        assert logits_ref.dtype == torch.bfloat16
        logp_ref = token_logprobs_naive(logits_ref, labels)
        loss_ref, _ = ppo_policy_loss_naive(logits_ref, labels, logp.detach() + 0.1, torch.ones(8), mask)
        (logp_ref.sum() + loss_ref).backward()
    torch.testing.assert_close(logp, logp_ref, **FWD_TOL[torch.bfloat16])
    torch.testing.assert_close(loss, loss_ref, **FWD_TOL[torch.bfloat16])
    for g, g_ref in zip(ours, _grads(leaves)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, **GRAD_TOL[torch.bfloat16])


def test_only_chunk_rows_of_logits_exist(monkeypatch):
    shapes = []
    original = fused_linear._linear
    monkeypatch.setattr(fused_linear, "_linear", lambda h, w, b: shapes.append(tuple(h.shape)) or original(h, w, b))
    hidden, weight, _ = _params(20, 16, 300, torch.float32, False, False)
    labels = torch.randint(0, 300, (20,))
    labels[:5] = -100
    fused_linear_token_logprobs(hidden, weight, labels, chunk_size=4, backend="triton").sum().backward()
    # 15 counted rows in chunks of at most 4, once in the forward and once in the backward
    assert max(rows for rows, _ in shapes) == 4 and sum(rows for rows, _ in shapes) == 2 * 15


def test_chunk_size_derivation():
    # Liger's rule: C * V ~ N * H; N = 8192, H = 4096, V = 151936 -> ceil(V / H) = 38 -> C = 256
    assert fused_linear._chunk_rows(8192, 151936, 4096, None) == 256
    assert fused_linear._chunk_rows(8192, 32000, 4096, None) == 1024  # ceil(32000/4096) = 8
    assert fused_linear._chunk_rows(3, 1000, 64, None) == 1
    assert fused_linear._chunk_rows(3, 1000, 64, 7) == 7


def test_errors_name_the_argument():
    hidden, weight, bias = _params(4, 8, 50, torch.float32, True, False)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 8 to match hidden \[4, 8\]; got \[50, 7\]"):
        fused_linear_token_logprobs(hidden, weight[:, :7], labels)
    with pytest.raises(TypeError, match="weight must have hidden's dtype and device"):
        fused_linear_token_logprobs(hidden, weight.detach().bfloat16(), labels)
    with pytest.raises(ValueError, match=r"bias must be \[V\] = \[50\]"):
        fused_linear_token_logprobs(hidden, weight, labels, bias=bias[:10])
    with pytest.raises(ValueError, match=r"labels must be \[4\] int64 to match hidden \[4, 8\]; got \[5\]"):
        fused_linear_token_logprobs(hidden, weight, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None; got 0"):
        fused_linear_token_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=50\) where mask is True; found 50"):
        fused_linear_ppo_loss(hidden, weight, torch.full((4,), 50), torch.zeros(4), torch.ones(4),
                              torch.ones(4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# The model's logit transform (logit_scale, logit_softcap): Cohere, Granite, Gemma 2
# ----------------------------------------------------------------------------------------------
# (logit_scale, logit_softcap): Cohere's scale alone, Gemma 2's softcap alone, both, a tight softcap
TRANSFORMS = [(0.0625, None), (1.0, 30.0), (2.0, 30.0), (1.5, 2.0)]


def _wide_params(N, H, V, dtype, with_bias, weight_grad):
    # logits of std ~8 so that the softcap at 30 (and surely at 2) bends them
    hidden = (8 * torch.randn(N, H)).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) / H**0.5).to(dtype).requires_grad_(weight_grad)
    bias = torch.randn(V).to(dtype).requires_grad_(weight_grad) if with_bias else None
    return hidden, weight, bias


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale, logit_softcap", TRANSFORMS)
def test_token_logprobs_logit_transform_matches_unfused(backend, dtype, logit_scale, logit_softcap):
    N, H, V = 12, 64, 1000  # V = 1000: the Triton block is 1024, so 24 padding columns per row
    hidden, weight, bias = _wide_params(N, H, V, dtype, True, True)
    labels = torch.randint(0, V, (N,))
    labels[[2, 7]] = -100
    g_logp, g_ent = torch.randn(N), torch.randn(N)
    leaves = (hidden, weight, bias)
    transform = dict(logit_scale=logit_scale, logit_softcap=logit_softcap)
    logp, entropy = fused_linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=0.9,
                                                return_entropy=True, chunk_size=4, backend=backend, **transform)
    (logp * g_logp + entropy * g_ent).sum().backward()
    ours = _grads(leaves)
    logp_ref, entropy_ref = token_logprobs_naive(F.linear(hidden, weight, bias), labels, 0.9, return_entropy=True,
                                                 **transform)
    (logp_ref * g_logp + entropy_ref * g_ent).sum().backward()
    expected = _grads(leaves)
    # the transform matters here: without it the log-probs are far off
    assert (logp - token_logprobs_naive(F.linear(hidden, weight, bias), labels, 0.9)).abs().max() > 0.5
    torch.testing.assert_close(logp, logp_ref, **FWD_TOL[dtype])
    torch.testing.assert_close(entropy, entropy_ref, **FWD_TOL[dtype])
    _assert_grads(ours, expected, dtype)
    assert logp[2] == 0 and entropy[7] == 0 and not ours[0][[2, 7]].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logit_scale, logit_softcap", TRANSFORMS)
@pytest.mark.parametrize("scale", [1.0, 2.0])  # 2.0: grad_output != 1 scales the stored gradients
def test_ppo_loss_logit_transform_matches_unfused(backend, dtype, logit_scale, logit_softcap, scale):
    N, H, V = 12, 64, 1000
    hidden, weight, bias = _wide_params(N, H, V, dtype, True, True)
    transform = dict(logit_scale=logit_scale, logit_softcap=logit_softcap)
    labels = torch.randint(0, V, (N,))
    mask = torch.arange(N) % 3 != 0
    labels[~mask] = -100
    with torch.no_grad():
        logp = token_logprobs_naive(F.linear(hidden, weight, bias), labels, **transform)
    old_logp = logp + torch.linspace(-2, 2, N)  # clipped and unclipped tokens
    advantages = torch.tensor([1.0, -1.0]).repeat(N // 2)
    leaves = (hidden, weight, bias)
    loss, stats = fused_linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, bias=bias,
                                        temperature=0.8, chunk_size=3, backend=backend, **transform)
    (scale * loss).backward()
    ours = _grads(leaves)
    loss_ref, stats_ref = ppo_policy_loss_naive(F.linear(hidden, weight, bias), labels, old_logp, advantages, mask,
                                                temperature=0.8, **transform)
    (scale * loss_ref).backward()
    torch.testing.assert_close(loss, loss_ref, **FWD_TOL[dtype])
    for key in ("clip_frac", "approx_kl", "entropy"):
        torch.testing.assert_close(stats[key], stats_ref[key], **FWD_TOL[dtype])
    _assert_grads(ours, _grads(leaves), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_odd_vocab_default_chunk(backend):
    # V = 32003: the last 4096-column block holds 3 real columns and 4093 padding ones
    hidden, weight, _ = _wide_params(6, 32, 32003, torch.float32, False, True)
    labels = torch.randint(0, 32003, (6,))
    mask = torch.tensor([True, False, True, True, False, True])
    advantages = torch.randn(6)
    leaves = (hidden, weight)
    logp = fused_linear_token_logprobs(hidden, weight, labels, backend=backend, logit_softcap=30.0)
    old_logp = logp.detach() - 0.1
    loss, _ = fused_linear_ppo_loss(hidden, weight, labels, old_logp, advantages, mask, backend=backend,
                                    logit_softcap=30.0)
    (logp.sum() + loss).backward()
    ours = _grads(leaves)
    logits_ref = F.linear(hidden, weight)
    logp_ref = token_logprobs_naive(logits_ref, labels, logit_softcap=30.0)
    loss_ref, _ = ppo_policy_loss_naive(logits_ref, labels, old_logp, advantages, mask, logit_softcap=30.0)
    (logp_ref.sum() + loss_ref).backward()
    torch.testing.assert_close(logp, logp_ref, **FWD_TOL[torch.float32])
    torch.testing.assert_close(loss, loss_ref, **FWD_TOL[torch.float32])
    _assert_grads(ours, _grads(leaves), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_of_huge_logits(backend):
    # logits near +-1e4 (bias +-1e4 over small hidden terms): the softcap bends them all to about
    # +-c, where tanh saturates; padding columns past V must still count for nothing (else row 0,
    # whose 1000 logits all sit at -c, would read log(1/1024) instead of log(1/1000))
    N, H, V = 4, 8, 1000
    hidden = (0.01 * torch.randn(N, H)).requires_grad_()
    weight = torch.randn(V, H).requires_grad_()
    bias = torch.where(torch.arange(V) % 3 == 0, 1e4, -1e4).float()
    bias[:3] = torch.tensor([1e4 - 5.0, 60.0, -30.0])  # one bent by the softcap, two softly
    bias.requires_grad_()
    labels = torch.tensor([0, 1, 2, 3])
    leaves = (hidden, weight, bias)
    all_low = torch.zeros(V).fill_(-1e4)
    logp_low = fused_linear_token_logprobs(hidden[:1], weight, labels[:1], bias=all_low, backend=backend,
                                           logit_softcap=30.0)
    torch.testing.assert_close(logp_low, torch.tensor([-math.log(V)]), atol=1e-5, rtol=0)
    logp, entropy = fused_linear_token_logprobs(hidden, weight, labels, bias=bias, return_entropy=True,
                                                backend=backend, logit_softcap=30.0)
    (logp.sum() + entropy.sum()).backward()
    ours = _grads(leaves)
    logp_ref, entropy_ref = token_logprobs_naive(F.linear(hidden, weight, bias), labels, return_entropy=True,
                                                 logit_softcap=30.0)
    (logp_ref.sum() + entropy_ref.sum()).backward()
    assert torch.isfinite(logp).all() and all(torch.isfinite(g).all() for g in ours)
    torch.testing.assert_close(logp, logp_ref, **FWD_TOL[torch.float32])
    torch.testing.assert_close(entropy, entropy_ref, **FWD_TOL[torch.float32])
    _assert_grads(ours, _grads(leaves), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_equals_the_written_out_formula(backend):
    # log_softmax(c * tanh(a * (h @ W^T) / c)) gathered at the labels, in float64 on the side
    N, H, V, a, c = 10, 16, 257, 2.5, 30.0
    hidden, weight, _ = _wide_params(N, H, V, torch.float32, False, False)
    labels = torch.randint(0, V, (N,))
    logp = fused_linear_token_logprobs(hidden, weight, labels, backend=backend, logit_scale=a, logit_softcap=c)
    y = hidden.detach().double() @ weight.detach().double().T  # [N, V]
    expected = torch.log_softmax(c * torch.tanh(a * y / c), -1).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(logp.double(), expected, atol=2e-5, rtol=1e-6)
    # and the transform matters: the plain logits would be off by nats
    assert (torch.log_softmax(y, -1).gather(1, labels[:, None])[:, 0] - expected).abs().max() > 1.0


def test_logit_transform_errors_name_the_argument():
    hidden, weight, _ = _params(4, 8, 50, torch.float32, False, False)
    labels = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="logit_scale must be a positive float; got 0"):
        fused_linear_token_logprobs(hidden, weight, labels, logit_scale=0)
    with pytest.raises(ValueError, match="logit_softcap must be a positive float; got -30.0"):
        fused_linear_ppo_loss(hidden, weight, labels, torch.zeros(4), torch.ones(4), torch.ones(4, dtype=torch.bool),
                              logit_softcap=-30.0)
