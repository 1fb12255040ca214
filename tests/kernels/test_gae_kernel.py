"""gae against a slow per-element Python loop (float64), and whiten against the direct formula."""

import pytest
import torch

from rlhf_kernels import gae, whiten

# The Triton kernel recurses in fp32: ~T * 1e-7 relative over a sequence. The torch path keeps
# float64 inputs in float64, so it must match the loop to rounding.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-5),  # inputs rounded to bf16 first, on both sides
}
BACKENDS = ("triton", "torch")


def slow_gae(rewards, values, mask, gamma, lam):
    """Per-element loop over valid tokens only (lm-human-preference-details' test style): masked
    positions are skipped and keep A = R = 0; after the last valid token V = A = 0."""
    B, T = rewards.shape
    advantages = [[0.0] * T for _ in range(B)]
    returns = [[0.0] * T for _ in range(B)]
    for b in range(B):
        valid = [t for t in range(T) if mask[b][t]]
        last_gae = 0.0
        for k in reversed(range(len(valid))):
            t = valid[k]
            next_value = float(values[b][valid[k + 1]]) if k + 1 < len(valid) else 0.0
            delta = float(rewards[b][t]) + gamma * next_value - float(values[b][t])
            last_gae = delta + gamma * lam * last_gae
            advantages[b][t] = last_gae
            returns[b][t] = last_gae + float(values[b][t])
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def _batch(B, T):
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,))
    mask = torch.arange(T)[None, :] < lengths[:, None]  # right padding
    mask[0] = True  # a full row
    mask[1] = False  # an empty row
    mask[2, : T // 3] = False  # a row with leading zeros too
    mask[3, T // 2] = False  # a hole in the middle: skipped
    return rewards, values, mask


# float64 only on the torch path: the kernels compute in fp32 (and refuse float64)
@pytest.mark.parametrize(
    "backend, dtype",
    [("triton", torch.float32), ("triton", torch.bfloat16), ("torch", torch.float64), ("torch", torch.float32)],
)
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.0, 0.0)])
def test_matches_slow_loop(backend, dtype, gamma, lam):
    rewards, values, mask = _batch(6, 37)
    rewards, values = rewards.to(dtype), values.to(dtype)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    expected_adv, expected_ret = slow_gae(rewards.double(), values.double(), mask, gamma, lam)
    assert advantages.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(advantages.double(), expected_adv, **TOL[dtype])
    torch.testing.assert_close(returns.double(), expected_ret, **TOL[dtype])
    assert not advantages[~mask].any() and not returns[~mask].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_by_hand(backend):
    # gamma = 1, lam = 0.95, rewards [0, 0, 1], values [0.5, 0.5, 0.5], then one pad:
    # t2: delta = 1 + 0 - 0.5 = 0.5 (V after the last token is 0);  A2 = 0.5
    # t1: delta = 0 + 0.5 - 0.5 = 0;  A1 = 0 + 0.95 * 0.5 = 0.475
    # t0: delta = 0;                  A0 = 0.95 * 0.475 = 0.45125
    # returns = A + V = [0.95125, 0.975, 1.0];  the pad gets 0 (its reward 9 is ignored)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=backend)
    torch.testing.assert_close(advantages, torch.tensor([[0.45125, 0.475, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.95125, 0.975, 1.0, 0.0]]))


def test_whiten_matches_direct_formula():
    x = torch.randn(4, 9, dtype=torch.float64) * 3 + 2
    mask = torch.rand(4, 9) > 0.3
    valid = x[mask]
    mean, std = valid.mean(), valid.std(unbiased=True)  # the unbiased variance, as TRL's masked_whiten
    expected = torch.where(mask, (x - mean) / torch.sqrt(std**2 + 1e-8), torch.zeros_like(x))
    torch.testing.assert_close(whiten(x, mask), expected)
    expected_unshifted = torch.where(mask, expected + mean, torch.zeros_like(x))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), expected_unshifted)
    out = whiten(x.float(), mask)
    assert out.dtype == torch.float32
    assert out[mask].mean().abs() < 1e-6 and (out[mask].std() - 1).abs() < 1e-4


def test_whiten_degenerate_masks():
    x = torch.randn(2, 3)
    assert not whiten(x, torch.zeros(2, 3, dtype=torch.bool)).any()  # nothing valid: zeros, not NaN
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 2] = True
    assert not whiten(x, one).any()  # a single valid entry whitens to 0


def test_errors_name_the_argument():
    rewards, values, mask = _batch(4, 5)
    with pytest.raises(ValueError, match=r"values requires grad, .* pass values.detach\(\)"):
        gae(rewards, values.requires_grad_(), mask)
    with pytest.raises(ValueError, match=r"rewards must be \[B, T\]; got \[20\]"):
        gae(rewards.reshape(-1), values.detach().reshape(-1), mask.reshape(-1))
    with pytest.raises(ValueError, match=r"lam must be a float in \[0, 1\]; got 1.5"):
        gae(rewards, values.detach(), mask, lam=1.5)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 \(bool, int or float\); got 0.5"):
        whiten(rewards, mask.float() * 0.5)
