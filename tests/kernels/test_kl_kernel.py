"""kl_penalty: the k1/k2/k3 estimators against the reference formula and by hand."""

import math

import pytest
import torch

from rlhf_kernels import kl_penalty
from rlhf_kernels.reference import kl_penalty_reference

# Elementwise fp32 math on the same upcast inputs: tight everywhere. Gradients come back in the
# input dtype, so they carry one rounding in it.
FWD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.bfloat16: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(atol=1e-6, rtol=1e-6),
}
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
BACKENDS = ("triton", "torch")
ESTIMATORS = ("k1", "k2", "k3")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", tuple(FWD_TOL))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matches_reference(backend, dtype, estimator):
    # [B, T] = [3, 700]: more than one 1024-block, and a ragged last one
    logp = (torch.randn(3, 700) - 5).to(dtype).requires_grad_()
    ref_logp = (logp.detach().float() + torch.randn(3, 700)).to(dtype).requires_grad_()
    upstream = torch.randn(3, 700)
    kl = kl_penalty(logp, ref_logp, estimator, backend=backend)
    (kl * upstream).sum().backward()
    ours = (kl, logp.grad, ref_logp.grad)
    logp.grad = ref_logp.grad = None
    expected_kl = kl_penalty_reference(logp, ref_logp, estimator)
    (expected_kl * upstream).sum().backward()
    assert kl.dtype == torch.float32 and kl.shape == (3, 700)
    torch.testing.assert_close(ours[0], expected_kl, **FWD_TOL[dtype])
    torch.testing.assert_close(ours[1], logp.grad, **GRAD_TOL[dtype])
    torch.testing.assert_close(ours[2], ref_logp.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_by_hand(backend):
    # policy p(y) = 0.5, reference 0.25: r = ref_logp - logp = ln(0.5) = -0.693147
    # k1 = -r = 0.693147;  k2 = r^2 / 2 = 0.240227;  k3 = e^r - r - 1 = 0.5 + 0.693147 - 1 = 0.193147
    logp = torch.tensor([math.log(0.5)])
    ref_logp = torch.tensor([math.log(0.25)])
    expected = {"k1": 0.693147, "k2": 0.240227, "k3": 0.193147}
    for estimator, value in expected.items():
        assert kl_penalty(logp, ref_logp, estimator, backend=backend).item() == pytest.approx(value, abs=1e-6)
    # equal log-probs: every estimator is 0
    for estimator in ESTIMATORS:
        assert kl_penalty(logp, logp.clone(), estimator, backend=backend).item() == 0.0


def test_errors():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"estimator must be one of \['k1', 'k2', 'k3'\]; got 'k4'"):
        kl_penalty(logp, logp, "k4")
    with pytest.raises(ValueError, match=r"ref_logp must be \[2, 3\] to match logp; got \[3\]"):
        kl_penalty(logp, torch.zeros(3))
