"""ppo_value_loss: the fused elementwise kernel against the reference and by hand."""

import pytest
import torch

from rlhf_kernels import ppo_value_loss
from rlhf_kernels.reference import ppo_value_loss_reference

# Same upcast inputs, fp32 math on both sides; the kernel's gradient is cast to values' dtype once.
FWD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-6, rtol=1e-5),
}
GRAD_TOL = {
    torch.float32: dict(atol=1e-7, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-2),
    torch.float16: dict(atol=1e-6, rtol=1e-3),
}
BACKENDS = ("triton", "torch")


def _batch(B, T, dtype):
    values = torch.randn(B, T).to(dtype)
    old_values = (values.float() + 0.4 * torch.randn(B, T)).to(dtype)  # ~half the tokens beyond eps
    returns = torch.randn(B, T)
    mask = torch.rand(B, T) > 0.25
    return values, old_values, returns, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", tuple(FWD_TOL))
@pytest.mark.parametrize("scale", [1.0, 0.5])  # 0.5: grad_output != 1, the scaling path
def test_matches_reference(backend, dtype, scale):
    values, old_values, returns, mask = _batch(5, 300, dtype)  # 1500 > one 1024-block
    outs = []
    for fn in (lambda v: ppo_value_loss(v, old_values, returns, mask, 0.2, backend=backend),
               lambda v: ppo_value_loss_reference(v, old_values, returns, mask, 0.2)):
        v = values.clone().requires_grad_()
        loss, stats = fn(v)
        (loss * scale).backward()
        outs.append((loss, stats["clip_frac"], v.grad))
    (loss, clip_frac, grad), (loss_ref, clip_frac_ref, grad_ref) = outs
    assert loss.dtype == torch.float32 and grad.dtype == dtype and not clip_frac.requires_grad
    assert 0.1 < clip_frac < 0.9
    torch.testing.assert_close(loss, loss_ref, **FWD_TOL[dtype])
    torch.testing.assert_close(clip_frac, clip_frac_ref, **FWD_TOL[dtype])
    torch.testing.assert_close(grad, grad_ref, **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_by_hand(backend):
    # eps = 0.2, R = 0 everywhere.
    # t0: V = 1.0, Vold = 0.5 -> V_clip = 0.7; squares 1.00 vs 0.49 -> 1.00 (unclipped), grad (V - R) = 1.0
    # t1: V = 0.1, Vold = 1.0 -> V_clip = 0.8; squares 0.01 vs 0.64 -> 0.64 (clipped; V outside: grad 0)
    # t2: V = 0.3, Vold = 0.2 -> V_clip = 0.3 (inside); both 0.09 -> unclipped, grad 0.3
    # t3: masked.   loss = 0.5 * (1.00 + 0.64 + 0.09) / 3 = 0.288333;  clip_frac = 1/3
    # grads / n = [1.0, 0.0, 0.3, 0] / 3
    values = torch.tensor([[1.0, 0.1, 0.3, 9.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 1.0, 0.2, 0.0]])
    loss, stats = ppo_value_loss(values, old_values, torch.zeros(1, 4), torch.tensor([[True, True, True, False]]),
                                 clip_eps=0.2, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(0.288333, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    torch.testing.assert_close(values.grad, torch.tensor([[1.0, 0.0, 0.3, 0.0]]) / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_is_zero_not_nan(backend):
    values = torch.randn(2, 3, requires_grad=True)
    loss, stats = ppo_value_loss(values, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool),
                                 backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and stats["clip_frac"].item() == 0.0 and not values.grad.any()


def test_errors_name_the_argument():
    values, old_values, returns, mask = _batch(2, 3, torch.float32)
    with pytest.raises(ValueError, match=r"returns requires grad, .* pass returns.detach\(\)"):
        ppo_value_loss(values, old_values, returns.requires_grad_(), mask)
    with pytest.raises(ValueError, match=r"old_values must be \[2, 3\] to match values; got \[3, 2\]"):
        ppo_value_loss(values, old_values.T, returns.detach(), mask)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 \(bool, int or float\); got 2"):
        ppo_value_loss(values, old_values, returns.detach(), mask.long() * 2)
