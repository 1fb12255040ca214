"""Backend choice for every public op: the Triton kernels or the chunked torch references.

Each public function takes `backend=None | "auto" | "triton" | "torch"`; `None` reads the
environment variable `RLHF_KERNELS_BACKEND` (`auto` when unset).

- `auto`: CUDA tensors take Triton; CPU tensors take the torch reference, except that when the
  Triton interpreter is on (`TRITON_INTERPRET=1` set before `rlhf_kernels` is imported) CPU tensors
  take Triton too, which is how the tests check the kernels without a GPU. float64 always takes
  torch: the kernels compute in fp32, float64 exists for `gradcheck` of the references.
- `triton`: the kernels, or a ValueError saying why they cannot run here.
- `torch`: the references in `rlhf_kernels/reference.py`.

Triton is optional (it has no macOS wheels): without it the kernel modules still import, through
the stand-in below, and `auto` always picks torch.
"""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _TritonMissing:
        """Stands in for `triton` and `triton.language` so that the kernel modules still define
        (never launch) their kernels: `@triton.jit` returns the function unchanged and the
        `tl.constexpr` annotations evaluate. Dispatch never picks Triton while this is in use."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _TritonMissing()


def _interpreter_on() -> bool:
    # Triton decides interpreter-or-compiler when `@triton.jit` runs, i.e. when our kernel modules
    # are imported, so the value that counts is the one at import time, recorded below.
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4 keeps its env settings here
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_INTERPRETED = _interpreter_on()

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "RLHF_KERNELS_BACKEND"


def use_triton(backend, tensor: torch.Tensor) -> bool:
    """True when the op on `tensor` (its main input) should run the Triton kernel."""
    if backend is None:
        choice, source = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"env {ENV_VAR}"
    else:
        choice, source = backend, "backend"
    if choice not in BACKENDS:
        raise ValueError(f"{source} must be one of {list(BACKENDS)}; got {choice!r}")
    if choice == "torch":
        return False
    runnable = HAS_TRITON and (tensor.is_cuda or TRITON_INTERPRETED)
    if choice == "auto":
        return runnable and tensor.dtype != torch.float64
    if not HAS_TRITON:
        raise ValueError(f"{source}='triton' but triton is not installed; use 'torch' or 'auto'")
    if not runnable:
        raise ValueError(
            f"{source}='triton' needs CUDA tensors (got {tensor.device}), or TRITON_INTERPRET=1 set "
            "before rlhf_kernels is imported to run the kernels on CPU"
        )
    return True


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype outputs are returned in: fp32 for any input dtype, fp64 for fp64 inputs
    (so that the references pass `gradcheck`)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
