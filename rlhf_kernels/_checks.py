"""Argument checks shared by the public functions, run before either backend so that both raise
the same message: it names the argument, the value found and the value needed, never a Triton
traceback (STYLE.md section 8). ValueError for wrong values and shapes, TypeError for dtypes."""

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def shape_str(t: torch.Tensor) -> str:
    return str(list(t.shape))


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")


def check_float(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")


def check_triton_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16 or float32 for backend='triton'; got {t.dtype} "
            "(float64 runs on backend='torch')"
        )


def check_logits(name: str, logits: torch.Tensor) -> None:
    check_float(name, logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must be [N, V] with V >= 1; got {shape_str(logits)}")


def check_labels(labels: torch.Tensor, logits: torch.Tensor, logits_name: str = "logits") -> None:
    check_tensor("labels", labels)
    lead = list(logits.shape[:-1])
    if labels.dtype != torch.int64 or list(labels.shape) != lead:
        raise ValueError(
            f"labels must be {lead} int64 to match {logits_name} {shape_str(logits)}; "
            f"got {shape_str(labels)} {labels.dtype}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels must be on {logits.device} like {logits_name}; got {labels.device}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype=None) -> None:
    """`t` must have the shape and device of `ref`; a float dtype unless `dtype` names one."""
    check_tensor(name, t)
    if list(t.shape) != list(ref.shape):
        raise ValueError(f"{name} must be {shape_str(ref)} to match {ref_name}; got {shape_str(t)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}; got {t.device}")
    if dtype is None:
        check_float(name, t)
    elif t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}; got {t.dtype}")


def as_bool_mask(name: str, mask, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """A mask shaped like `ref`, as bool (True = counts). bool passes as is; an integer or floating
    mask (TRL's `masked_mean` and Liger take {0, 1} floats) must hold only 0 and 1 and is converted
    once here, so the kernels see one dtype. Any other value (0.5, 2, -1, NaN) is refused: it would
    otherwise be silently read as a weight by some code and as True by other code. The value check
    costs one host sync for non-bool masks; bool masks cost none."""
    check_tensor(name, mask)
    if list(mask.shape) != list(ref.shape):
        raise ValueError(f"{name} must be {shape_str(ref)} to match {ref_name}; got {shape_str(mask)}")
    if mask.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}; got {mask.device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be a bool, integer or floating tensor of 0 and 1; got {mask.dtype}")
    mask = mask.detach()
    bad = (mask != 0) & (mask != 1)  # NaN is != both
    if bool(bad.any()):
        index = int(bad.flatten().nonzero()[0])
        value = mask.flatten()[index].item()
        raise ValueError(
            f"{name} must hold only 0 and 1 (bool, int or float); got {value} at flat index {index}"
        )
    return mask != 0


def check_no_grad(name: str, t: torch.Tensor) -> None:
    """PPO targets (old log-probs, advantages, old values, returns) are constants of the loss; a
    gradient for them would be dropped, so we refuse rather than drop it silently."""
    if t.requires_grad:
        raise ValueError(
            f"{name} requires grad, but it is a constant target of this loss and would get no "
            f"gradient; pass {name}.detach()"
        )


def check_targets(ref_name: str, ref: torch.Tensor, **targets: torch.Tensor) -> None:
    """Each target (old log-probs, advantages, old values, returns) is a float tensor shaped and
    placed like `ref`, and a constant: `check_like` and `check_no_grad` for each, in order."""
    for name, t in targets.items():
        check_like(name, t, ref_name, ref)
        check_no_grad(name, t)


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be a positive float; got {value!r}")


def check_label_range(labels: torch.Tensor, vocab: int, valid: torch.Tensor, what: str) -> None:
    """Every counted label must index a vocab column (the kernels never read out of bounds, they
    would return a wrong log-prob instead). One host sync, the price of a clear error."""
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        index = int(bad.flatten().nonzero()[0])
        value = int(labels.flatten()[index])
        raise ValueError(f"labels must lie in [0, V={vocab}) {what}; found {value} at flat row {index}")
