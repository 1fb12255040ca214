"""float64 gradcheck of the references: the naive formulas (autograd) and the chunked torch path
(explicit backward, the CPU backend), with chunks shrunk so that every op crosses several."""

import pytest
import torch
from torch.autograd import gradcheck

from rlhf_kernels import (
    fused_linear_ppo_loss,
    fused_linear_token_logprobs,
    kl_penalty,
    ppo_policy_loss,
    ppo_value_loss,
    reference,
    token_logprobs,
    whiten,
)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 24)  # 2-3 rows per chunk at V = 8..11


def _f64(*shape, requires_grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=requires_grad)


def _ppo_data(N, logits_fn):
    """Labels, old log-probs at ratios e^+-1 (away from the clip kinks at 0.8 and 1.2, where the
    loss is not differentiable), advantages of both signs, a mask with one masked row."""
    labels = torch.randint(0, 11, (N,))
    with torch.no_grad():
        logp = torch.log_softmax(logits_fn(), -1).gather(1, labels[:, None])[:, 0]
    old_logp = logp - torch.tensor([1.0, -1.0, 0.05, 1.0, -1.0, 0.0])[:N]
    advantages = torch.tensor([1.0, 1.0, -0.5, -1.0, -2.0, 0.3])[:N]
    mask = torch.tensor([True, True, True, True, True, False])[:N]
    return labels, old_logp, advantages, mask


def test_token_logprobs():
    logits = _f64(6, 11)
    labels = torch.tensor([0, 3, -100, 10, 5, 5])
    for fn in (lambda x: token_logprobs(x, labels, 0.7, return_entropy=True, backend="torch"),
               lambda x: reference.token_logprobs_naive(x, labels, 0.7, return_entropy=True)):
        assert gradcheck(fn, (logits,))


def test_ppo_policy_loss():
    logits = _f64(6, 11)
    labels, old_logp, advantages, mask = _ppo_data(6, lambda: logits / 0.9)
    for fn in (lambda x: ppo_policy_loss(x, labels, old_logp, advantages, mask, temperature=0.9, backend="torch")[0],
               lambda x: reference.ppo_policy_loss_naive(x, labels, old_logp, advantages, mask, temperature=0.9)[0]):
        assert gradcheck(fn, (logits,))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty(estimator):
    assert gradcheck(lambda a, b: kl_penalty(a, b, estimator, backend="torch"), (_f64(3, 4), _f64(3, 4)))


def test_ppo_value_loss():
    values = _f64(3, 5)
    old_values = values.detach() + 0.5 * torch.sign(torch.randn(3, 5))  # |V - Vold| = 0.5: far from the clip kink
    returns = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.2
    assert gradcheck(lambda v: ppo_value_loss(v, old_values, returns, mask, 0.2, backend="torch")[0], (values,))


def test_fused_linear_token_logprobs():
    hidden, weight, bias = _f64(5, 4), _f64(11, 4), _f64(11)
    labels = torch.tensor([1, -100, 10, 0, 7])
    fn = lambda h, w, b: fused_linear_token_logprobs(  # noqa: E731
        h, w, labels, bias=b, temperature=1.3, return_entropy=True, chunk_size=2, backend="torch"
    )
    assert gradcheck(fn, (hidden, weight, bias))


def test_fused_linear_ppo_loss():
    hidden, weight, bias = _f64(6, 4), _f64(11, 4), _f64(11)
    labels, old_logp, advantages, mask = _ppo_data(6, lambda: hidden @ weight.T + bias)
    fn = lambda h, w, b: fused_linear_ppo_loss(  # noqa: E731
        h, w, labels, old_logp, advantages, mask, bias=b, chunk_size=2, backend="torch"
    )[0]
    assert gradcheck(fn, (hidden, weight, bias))


def test_whiten():
    mask = torch.rand(3, 5) > 0.3
    assert gradcheck(lambda x: whiten(x, mask), (_f64(3, 5),))
    assert gradcheck(lambda x: whiten(x, mask, shift_mean=False), (_f64(3, 5),))


@pytest.mark.parametrize("logit_scale, logit_softcap", [(0.5, None), (1.7, 3.0)])
def test_fused_linear_with_logit_transform(logit_scale, logit_softcap):
    # the chunked path's hand-written chain rule through the scale and tanh, and the naive reference
    transform = dict(logit_scale=logit_scale, logit_softcap=logit_softcap)
    hidden, weight, bias = _f64(6, 4), _f64(11, 4), _f64(11)
    labels = torch.tensor([1, -100, 10, 0, 7, 3])
    fn = lambda h, w, b: fused_linear_token_logprobs(  # noqa: E731
        h, w, labels, bias=b, temperature=1.3, return_entropy=True, chunk_size=2, backend="torch", **transform
    )
    assert gradcheck(fn, (hidden, weight, bias))
    naive = lambda h, w, b: reference.token_logprobs_naive(  # noqa: E731
        h @ w.T + b, labels, 1.3, return_entropy=True, **transform
    )
    assert gradcheck(naive, (hidden, weight, bias))
    labels, old_logp, advantages, mask = _ppo_data(
        6, lambda: reference.transform_logits(hidden @ weight.T + bias, **transform)
    )
    fn = lambda h, w, b: fused_linear_ppo_loss(  # noqa: E731
        h, w, labels, old_logp, advantages, mask, bias=b, chunk_size=2, backend="torch", **transform
    )[0]
    assert gradcheck(fn, (hidden, weight, bias))
