"""Every public function that takes a mask accepts bool, integer or floating {0, 1} masks (TRL's
`masked_mean` / `masked_whiten` and Liger take float masks) with results identical to the bool
mask, and refuses any other value (0.5, 2, -1, NaN) with an error naming it: never a weighting."""

import pytest
import torch

from rlhf_kernels import fused_linear_ppo_loss, gae, ppo_policy_loss, ppo_value_loss, whiten

MASK_DTYPES = (torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("triton", "torch")
N, V, H = 12, 50, 8
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's exp(-inf) notes, interpreter


def _mask():
    return torch.arange(N).view(3, 4) % 3 != 1  # [3, 4] bool, with holes


def _policy_loss(mask, backend):
    logits = torch.randn(3, 4, V, generator=torch.Generator().manual_seed(1)).requires_grad_()
    labels = torch.arange(N).view(3, 4) % V
    old_logp = torch.full((3, 4), -4.0)
    advantages = torch.linspace(-1, 1, N).view(3, 4)
    loss, stats = ppo_policy_loss(logits, labels, old_logp, advantages, mask, backend=backend)
    return [loss, *stats.values(), *torch.autograd.grad(loss, logits)]


def _fused_policy_loss(mask, backend):
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 4, H, generator=gen).requires_grad_()
    weight = torch.randn(V, H, generator=gen).requires_grad_()
    labels = torch.arange(N).view(3, 4) % V
    loss, stats = fused_linear_ppo_loss(hidden, weight, labels, torch.full((3, 4), -4.0),
                                        torch.linspace(-1, 1, N).view(3, 4), mask, chunk_size=4, backend=backend)
    return [loss, *stats.values(), *torch.autograd.grad(loss, (hidden, weight))]


def _value_loss(mask, backend):
    values = torch.linspace(-2, 2, N).view(3, 4).requires_grad_()
    loss, stats = ppo_value_loss(values, torch.zeros(3, 4), torch.linspace(1, -1, N).view(3, 4), mask, backend=backend)
    return [loss, stats["clip_frac"], *torch.autograd.grad(loss, values)]


def _gae(mask, backend):
    rewards = torch.linspace(-1, 1, N).view(3, 4)
    return list(gae(rewards, rewards.flip(1), mask, gamma=0.9, backend=backend))


def _whiten(mask, backend):
    x = torch.linspace(-1, 3, N).view(3, 4).square().requires_grad_()
    out = whiten(x, mask)
    return [out, *torch.autograd.grad(out.sum() + out[0, 0], x)]


OPS = {"ppo_policy_loss": _policy_loss, "fused_linear_ppo_loss": _fused_policy_loss, "ppo_value_loss": _value_loss,
       "gae": _gae, "whiten": _whiten}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", MASK_DTYPES)
def test_int_and_float_masks_equal_the_bool_mask(op, dtype, backend):
    expected = OPS[op](_mask(), backend)
    ours = OPS[op](_mask().to(dtype), backend)
    for got, want in zip(ours, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value, shown", [(0.5, "0.5"), (2.0, "2.0"), (-1.0, "-1.0"), (float("nan"), "nan")])
def test_other_values_are_refused(op, value, shown):
    mask = _mask().float()
    mask[1, 2] = value
    message = rf"mask must hold only 0 and 1 \(bool, int or float\); got {shown} at flat index 6"
    with pytest.raises(ValueError, match=message):
        OPS[op](mask, "torch")


def test_integer_values_are_shown_as_integers_and_complex_masks_refused():
    with pytest.raises(ValueError, match=r"got 2 at flat index 0"):
        _gae(torch.full((3, 4), 2), "torch")
    with pytest.raises(TypeError, match="mask must be a bool, integer or floating tensor of 0 and 1; got torch.complex64"):
        _gae(_mask().to(torch.complex64), "torch")
