"""ppo_policy_loss: the fused kernel and the chunked torch path against the naive formula."""

import math

import pytest
import torch

from rlhf_kernels import ppo_policy_loss
from rlhf_kernels.reference import ppo_policy_loss_naive

# Loss and stats: fp32 math on the same upcast logits, differing in summation order only.
# d loss / d logits is stored in the logits' dtype: one rounding in it.
FWD_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-5, rtol=1e-5),
}
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=4e-3, rtol=1e-2),
    torch.float16: dict(atol=5e-4, rtol=1e-3),
}
BACKENDS = ("triton", "torch")
STATS = ("clip_frac", "approx_kl", "entropy")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's exp(-inf) notes, interpreter


def _batch(N, V, dtype, spread=4.0, temperature=1.0, with_masked_rows=True):
    """Logits, sampled labels, old log-probs whose log-ratios run over [-spread, spread] (ratios
    from e^-4 to e^4: far outside the clip range), advantages of alternating sign (so that both
    clipped and unclipped tokens occur) and a mask that drops every fourth row; masked rows carry
    the -100 labels padding usually has."""
    logits = (torch.randn(N, V) * 2).to(dtype)
    labels = torch.randint(0, V, (N,))
    mask = (torch.arange(N) % 4 != 3) if with_masked_rows else torch.ones(N, dtype=torch.bool)
    labels[~mask] = -100
    with torch.no_grad():
        logsm = torch.log_softmax(logits.float() / temperature, -1)
        logp = logsm.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    old_logp = logp - torch.linspace(-spread, spread, N)
    signs = torch.tensor([1.0, -1.0]).repeat(N)[:N]
    return logits, labels, old_logp, signs * (torch.rand(N) + 0.5), mask


def _compare(batch, backend, scale=1.0, **kwargs):
    logits, labels, old_logp, advantages, mask = batch
    outs = []
    for fn in (lambda x: ppo_policy_loss(x, labels, old_logp, advantages, mask, backend=backend, **kwargs),
               lambda x: ppo_policy_loss_naive(x, labels, old_logp, advantages, mask, **kwargs)):
        x = logits.detach().clone().requires_grad_()
        loss, stats = fn(x)
        (loss * scale).backward()
        outs.append((loss, stats, x.grad))
    (loss, stats, grad), (loss_ref, stats_ref, grad_ref) = outs
    tol = FWD_TOL[logits.dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, loss_ref, **tol)
    for key in STATS:
        assert stats[key].dtype == torch.float32 and not stats[key].requires_grad
        torch.testing.assert_close(stats[key], stats_ref[key], **tol)
    torch.testing.assert_close(grad, grad_ref, **GRAD_TOL[logits.dtype])
    return loss, stats, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", tuple(FWD_TOL))
@pytest.mark.parametrize("V", [1000, 32003])
def test_matches_naive(backend, dtype, V):
    N = 8 if V == 1000 else 4
    loss, stats, grad = _compare(_batch(N, V, dtype, temperature=0.8), backend, temperature=0.8)
    assert 0 < stats["clip_frac"] < 1  # ratios up to e^4: some tokens are clipped, some are not


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen_vocab_asymmetric_clip_and_scaled_backward(backend):
    # clip-higher (eps_high != eps) and grad_output = 3: the backward's slow path (the scale)
    _compare(_batch(3, 151936, torch.bfloat16, with_masked_rows=False), backend, scale=3.0,
             clip_eps=0.2, clip_eps_high=0.28)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_one_is_the_fast_path_and_matches(backend, monkeypatch):
    calls = []
    original = torch.Tensor.mul_
    monkeypatch.setattr(torch.Tensor, "mul_", lambda self, other: calls.append(1) or original(self, other))
    _compare(_batch(4, 300, torch.float32), backend, scale=1.0)
    fast_calls = len(calls)
    _compare(_batch(4, 300, torch.float32), backend, scale=2.0)
    assert len(calls) > fast_calls  # only grad_output != 1 rescales the stored gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_by_hand(backend):
    # V = 2, logits [0, 0]: logp = ln 1/2 for label 0; old_logp = ln 1/2 - 1, so ratio = e = 2.718282.
    # row 0, A = +1: -A*ratio = -2.718282, -A*clip(ratio, 0.8, 1.2) = -1.2 -> max -1.2 (clipped, no grad)
    # row 1, A = -1: +2.718282 vs +1.2 -> max 2.718282 (unclipped)
    # row 2: masked.   loss = (-1.2 + 2.718282) / 2 = 0.759141
    # clip_frac = 1/2; approx_kl = (e - 1) - 1 = 0.718282; entropy = ln 2 = 0.693147
    # d loss / d logp_1 = -A * ratio / n = e / 2 = 1.359141; d / d logits_1 = 1.359141 * ([1, 0] - [1/2, 1/2])
    logits = torch.zeros(3, 2, requires_grad=True)
    loss, stats = ppo_policy_loss(
        logits, torch.tensor([0, 0, 0]), torch.full((3,), math.log(0.5) - 1), torch.tensor([1.0, -1.0, 5.0]),
        torch.tensor([True, True, False]), clip_eps=0.2, backend=backend,
    )
    loss.backward()
    assert loss.item() == pytest.approx(0.759141, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx(0.718282, abs=1e-6)
    assert stats["entropy"].item() == pytest.approx(0.693147, abs=1e-6)
    expected = torch.tensor([[0.0, 0.0], [0.679570, -0.679570], [0.0, 0.0]])
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_is_zero_not_nan(backend):
    logits = torch.randn(4, 100, requires_grad=True)
    loss, stats = ppo_policy_loss(logits, torch.full((4,), -100), torch.zeros(4), torch.ones(4),
                                  torch.zeros(4, dtype=torch.bool), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and all(stats[k].item() == 0.0 for k in STATS)
    assert not logits.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_reads_once_and_matches(backend):
    logits, labels, old_logp, advantages, mask = _batch(5, 500, torch.float32)
    with torch.no_grad():
        loss, stats = ppo_policy_loss(logits, labels, old_logp, advantages, mask, backend=backend)
    loss_ref, stats_ref = ppo_policy_loss_naive(logits, labels, old_logp, advantages, mask)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(stats["entropy"], stats_ref["entropy"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_goes_into_the_callers_buffer(backend):
    # logits that are not a leaf (the LM head's output): the gradient flowing back *is* the buffer
    logits, labels, old_logp, advantages, mask = _batch(4, 300, torch.float32)
    base = logits.clone().requires_grad_()
    x = base * 1.0
    buffer = torch.full_like(logits, float("nan"))
    seen = []
    x.register_hook(lambda g: seen.append(g.data_ptr()))
    loss, _ = ppo_policy_loss(x, labels, old_logp, advantages, mask, grad_logits_out=buffer, backend=backend)
    expected_x = logits.clone().requires_grad_()
    ppo_policy_loss_naive(expected_x, labels, old_logp, advantages, mask)[0].backward()
    # written during the forward, before any backward
    torch.testing.assert_close(buffer, expected_x.grad, **GRAD_TOL[torch.float32])
    (2 * loss).backward()
    assert seen == [buffer.data_ptr()]  # no copy on the way back
    torch.testing.assert_close(buffer, 2 * expected_x.grad, **GRAD_TOL[torch.float32])  # scaled in place
    torch.testing.assert_close(base.grad, 2 * expected_x.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_in_place_over_the_logits(backend):
    logits, labels, old_logp, advantages, mask = _batch(4, 300, torch.float32)
    expected_x = logits.clone().requires_grad_()
    loss_ref = ppo_policy_loss_naive(expected_x, labels, old_logp, advantages, mask)[0]
    loss_ref.backward()
    x = logits.clone().requires_grad_()
    loss, _ = ppo_policy_loss(x, labels, old_logp, advantages, mask, grad_logits_out=x, backend=backend)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(x.detach(), expected_x.grad, **GRAD_TOL[torch.float32])  # logits overwritten
    loss.backward()
    torch.testing.assert_close(x.grad, expected_x.grad, **GRAD_TOL[torch.float32])


def test_errors_name_the_argument():
    logits, labels, old_logp, advantages, mask = _batch(4, 50, torch.float32)
    with pytest.raises(ValueError, match=r"old_logp requires grad, .* pass old_logp.detach\(\)"):
        ppo_policy_loss(logits, labels, old_logp.requires_grad_(), advantages, mask)
    old_logp = old_logp.detach()
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 \(bool, int or float\); got -1.0"):
        ppo_policy_loss(logits, labels, old_logp, advantages, -mask.float())
    with pytest.raises(ValueError, match=r"advantages must be \[4\] to match labels; got \[4, 1\]"):
        ppo_policy_loss(logits, labels, old_logp, advantages[:, None], mask)
    bad = labels.clone()
    bad[0] = 50  # row 0 is always valid
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V=50\) where mask is True; found 50"):
        ppo_policy_loss(logits, bad, old_logp, advantages, mask)
    with pytest.raises(ValueError, match="clip_eps must be a positive float; got -0.1"):
        ppo_policy_loss(logits, labels, old_logp, advantages, mask, clip_eps=-0.1)
    message = r"grad_logits_out must be a contiguous torch.float32 tensor of shape \[4, 50\] on cpu"
    with pytest.raises(ValueError, match=message):
        ppo_policy_loss(logits.requires_grad_(), labels, old_logp, advantages, mask,
                        grad_logits_out=torch.empty(4, 49))
