"""The LM head fused with the log-prob and PPO-loss kernels, chunk by chunk over tokens.

Math: y = hidden @ weight^T (+ bias), then the model's own logit transform (`logit_transform.py`)
    z = logit_scale * y;   z = logit_softcap * tanh(z / logit_softcap)  when a softcap is given
(Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's 1 / logits_scaling; z = y at the
defaults, bit for bit), then exactly `token_logprobs` / `ppo_policy_loss` on z (temperature,
log-softmax in fp32). The transform runs inside the kernels in fp32, on the [C, V] block as loaded.
The gradients follow by the chain rule, per chunk of C rows:
    d logits_c = d z_c * logit_scale * (1 - tanh^2(logit_scale * y_c / logit_softcap))
                 (d z_c * logit_scale without a softcap; computed inside the kernels too)
    d hidden_c = d logits_c @ weight             [C, H]
    d weight  += d logits_c^T @ hidden_c         [V, H]   (only when weight requires grad)
    d bias    += sum over rows of d logits_c     [V]      (only when bias requires grad)
Shapes: hidden [N, H] (or [..., H]), weight [V, H], bias [V] or None, labels [N] int64.
Source: Liger's chunked fused linear cross entropy (src/liger_kernel/ops/fused_linear_cross_entropy.py
and chunked_loss/fused_linear_ppo.py at ead96b6): the logits exist one [C, V] block at a time.
Only counted rows (labels != ignore_index, or mask True) are gathered and multiplied: prompt and
padding tokens cost no LM-head FLOPs, and N = 0 counted rows launch nothing.
Numerics: the matmul runs in the inputs' dtype (bf16 on GPU, fp32 accumulation inside the GEMM),
or in the autocast dtype under autocast, as the model's own LM head would, so these log-probs
equal `token_logprobs(lm_head(hidden))`; everything after it is fp32. d weight accumulates across chunks in weight's dtype (one rounding
per chunk; fp32 accumulation would cost an extra fp32 [V, H], 2.5 GB at V = 152k, H = 4096).
Two strategies for the gradient:
- `fused_linear_ppo_loss` returns a scalar, so its forward already writes d loss / d logits into
  the chunk's own logits buffer (in place) and folds it into d hidden / d weight; backward only
  scales them by grad_output (skipped when it is 1).
- `fused_linear_token_logprobs` returns per-token values whose upstream gradient is unknown in the
  forward, so its backward recomputes each chunk's logits (one extra matmul, never the full
  logits) and, on the Triton path, their softmax from the [N] fp32 logsumexp the forward saved.
"""

import math

import torch

from . import _checks
from ._dispatch import compute_dtype, use_triton
from .logit_transform import check_transform
from .logprobs import logprobs_bwd, logprobs_fwd
from .ppo_loss import check_policy_args, policy_loss_rows, scale_stored_grads_

# The reference: the unfused composition, e.g. `reference.token_logprobs_naive(F.linear(hidden,
# weight, bias), labels)`, which the tests compare against.


def _chunk_rows(n_rows: int, vocab: int, hidden_size: int, chunk_size) -> int:
    """Rows per chunk. Liger's derivation (ops/fused_linear_cross_entropy.py): make the [C, V]
    logits block cost about what the [N, H] hidden input already does, C * V ~= N * H, so the
    extra memory is bounded by the input: C = N / ceil(V / H), rounded up to a power of two for
    GEMM-friendly shapes. At N = 8192, H = 4096, V = 151936: ceil(V / H) = 38, C = 256, a 78 MB
    bf16 block (the hidden is 67 MB) instead of 2.49 GB of logits."""
    if chunk_size is not None:
        return chunk_size
    per_row = math.ceil(vocab / hidden_size)
    return 1 << max(0, math.ceil(n_rows / per_row) - 1).bit_length()


def _linear(hidden_c, weight, bias):
    # [C, H] @ [H, V] -> [C, V] in the inputs' dtype
    return torch.addmm(bias, hidden_c, weight.t()) if bias is not None else hidden_c @ weight.t()


def _accumulate_grads(grad_logits_c, hidden_c, rows_c, weight, grads):
    """Fold one chunk's d logits [C, V] into d hidden [N, H], d weight [V, H], d bias [V]."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        grad_hidden.index_copy_(0, rows_c, grad_logits_c @ weight)  # [C, H]
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits_c.t(), hidden_c)  # [V, C] @ [C, H]
    if grad_bias is not None:
        grad_bias.add_(grad_logits_c.sum(0, dtype=grad_bias.dtype))  # [V], fp32 accumulation


def _new_grads(hidden, weight, bias, needs):
    need_hidden, need_weight, need_bias = needs
    return (
        torch.zeros_like(hidden) if need_hidden else None,  # [N, H]; uncounted rows stay 0
        torch.zeros_like(weight) if need_weight else None,  # [V, H]
        torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None,  # [V]
    )


class _FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, rows, temperature, ignore_index, return_entropy, chunk,
        triton_path, transform,
    ):  # fmt: skip
        # transform: (logit_scale, logit_softcap or None), see logit_transform.py
        # hidden [N, H]; labels [N]; rows [Nv] int64 indices of the counted rows
        N, dtype = hidden.shape[0], compute_dtype(hidden)
        logp = torch.zeros(N, dtype=dtype, device=hidden.device)  # [N]
        entropy = torch.zeros(N, dtype=dtype, device=hidden.device) if return_entropy else None  # [N]
        lse_parts, entropy_parts = [], []  # per chunk, [C] each: what the backward needs
        for start in range(0, rows.numel(), chunk):
            rows_c = rows[start : start + chunk]  # [C]
            logits_c = _linear(hidden.index_select(0, rows_c), weight, bias)  # [C, V]
            logp_c, lse_c, entropy_c = logprobs_fwd(
                logits_c, labels.index_select(0, rows_c), temperature, ignore_index,
                return_entropy, triton_path, *transform,
            )  # fmt: skip
            logp.index_copy_(0, rows_c, logp_c)
            lse_parts.append(lse_c)
            if return_entropy:
                entropy.index_copy_(0, rows_c, entropy_c)
                entropy_parts.append(entropy_c)
        # [Nv] each, or None: no rows, no entropy, or the torch path (which saves no logsumexp)
        lse = torch.cat(lse_parts) if lse_parts and lse_parts[0] is not None else None
        entropy_v = torch.cat(entropy_parts) if entropy_parts else None
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse, entropy_v)
        ctx.args = (temperature, ignore_index, chunk, triton_path, transform)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, rows, lse, entropy_v = ctx.saved_tensors
        temperature, ignore_index, chunk, triton_path, transform = ctx.args
        grads = _new_grads(hidden, weight, bias, ctx.needs_input_grad[:3])
        for start in range(0, rows.numel(), chunk):
            rows_c = rows[start : start + chunk]  # [C]
            hidden_c = hidden.index_select(0, rows_c)  # [C, H]
            logits_c = _linear(hidden_c, weight, bias)  # [C, V], recomputed: one extra matmul
            lse_c = lse[start : start + chunk] if lse is not None else None
            logprobs_bwd(
                logits_c, labels.index_select(0, rows_c), lse_c,
                entropy_v[start : start + chunk] if entropy_v is not None else None,
                grad_logp.index_select(0, rows_c) if grad_logp is not None else None,
                grad_entropy.index_select(0, rows_c) if grad_entropy is not None else None,
                temperature, ignore_index, logits_c, triton_path, *transform,
            )  # fmt: skip  (logits_c now holds d loss / d logits_c)
            _accumulate_grads(logits_c, hidden_c, rows_c, weight, grads)
        grad_hidden, grad_weight, grad_bias = grads
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return (grad_hidden, grad_weight, grad_bias) + (None,) * 8


class _FusedLinearPPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, old_logp, advantages, rows, n_valid, temperature,
        clip_low, clip_high, chunk, needs, triton_path, transform,
    ):  # fmt: skip
        # hidden [N, H]; labels, old_logp, advantages [N]; rows [Nv] indices where mask is True
        grads = _new_grads(hidden, weight, bias, needs)
        write_grad = any(needs)
        sums = torch.zeros(4, dtype=compute_dtype(hidden), device=hidden.device)  # loss, clip, kl, H
        all_valid = torch.ones(chunk, dtype=torch.bool, device=hidden.device)  # [C]: rows are compacted
        for start in range(0, rows.numel(), chunk):
            rows_c = rows[start : start + chunk]  # [C]
            hidden_c = hidden.index_select(0, rows_c)  # [C, H]
            logits_c = _linear(hidden_c, weight, bias)  # [C, V]
            row_terms = policy_loss_rows(
                logits_c, labels.index_select(0, rows_c), old_logp.index_select(0, rows_c),
                advantages.index_select(0, rows_c), all_valid[: rows_c.numel()], n_valid,
                temperature, clip_low, clip_high, logits_c if write_grad else None, triton_path,
                *transform,
            )  # fmt: skip  (with write_grad, logits_c now holds d loss / d logits_c)
            sums += torch.stack([t.sum() for t in row_terms])
            if write_grad:
                _accumulate_grads(logits_c, hidden_c, rows_c, weight, grads)
        ctx.save_for_backward(*grads)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        stats = sums[1:] / n_valid  # [3] clip_frac, approx_kl, entropy
        ctx.mark_non_differentiable(stats)
        return sums[0] / n_valid, stats

    @staticmethod
    def backward(ctx, grad_loss, unused_stats_grad):
        grad_hidden, grad_weight, grad_bias = scale_stored_grads_(ctx, ctx.saved_tensors, grad_loss)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return (grad_hidden, grad_weight, grad_bias) + (None,) * 12


def _prepare_linear(hidden, weight, bias, chunk_size):
    """Checks the LM-head arguments and applies autocast's rule for them. Under autocast (the
    trainers' bf16 mode on CUDA) the head runs in the autocast dtype, as nn.Linear would; the casts
    happen here, explicitly and differentiably, and the Functions then run with autocast off, so
    that the forward, the backward's recomputed logits and the gradient buffers share one dtype."""
    _checks.check_float("hidden", hidden)
    _checks.check_float("weight", weight)
    if bias is not None:
        _checks.check_float("bias", bias)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be [N, H]; got {_checks.shape_str(hidden)}")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be [V, H] with H = {H} to match hidden {_checks.shape_str(hidden)}; "
            f"got {_checks.shape_str(weight)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(
            f"weight must have hidden's dtype and device ({hidden.dtype} on {hidden.device}); "
            f"got {weight.dtype} on {weight.device}"
        )
    if bias is not None:
        if list(bias.shape) != [weight.shape[0]] or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"bias must be [V] = [{weight.shape[0]}] {weight.dtype} on {weight.device} like weight; "
                f"got {_checks.shape_str(bias)} {bias.dtype} on {bias.device}"
            )
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    return hidden, weight, bias


def _needs_grad(*tensors):
    return tuple(t is not None and t.requires_grad and torch.is_grad_enabled() for t in tensors)


def fused_linear_token_logprobs(
    hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100, return_entropy=False,
    chunk_size=None, backend=None, logit_scale: float = 1.0, logit_softcap: float | None = None,
):  # fmt: skip
    """token_logprobs(z, labels) with z = transform(hidden @ weight^T + bias), never more than
    [chunk, V] logits.

    hidden: [N, H] (or [..., H]) fp16/bf16/fp32, weight [V, H] and bias [V] of the same dtype;
    labels [N] (or [...]) int64 with ignore_index rows skipped (logp, entropy, gradient 0).
    Gradients flow to hidden, and to weight and bias when they require grad (a trainable head).
    chunk_size: rows per LM-head block, default derived from N, V, H (see `_chunk_rows`).
    logit_scale, logit_softcap: the model's transform of its logits, before the temperature:
    z = logit_scale * y, then z = logit_softcap * tanh(z / logit_softcap) when a softcap is given
    (Gemma 2: logit_softcap=final_logit_softcapping; Cohere: logit_scale=logit_scale; Granite:
    logit_scale=1 / logits_scaling). Gradients include its chain rule. Defaults: no transform.
    Returns logp [N] fp32, or (logp, entropy). Two host syncs: the label check and the row gather.
    The SFT loss is `-logp.sum() / (labels != ignore_index).sum()`.
    """
    hidden, weight, bias = _prepare_linear(hidden, weight, bias, chunk_size)
    _checks.check_labels(labels, hidden, "hidden")
    _checks.check_positive("temperature", temperature)
    transform = check_transform(logit_scale, logit_softcap)
    V, H = weight.shape
    counted = labels != ignore_index
    _checks.check_label_range(labels, V, counted, f"or equal ignore_index={ignore_index}")
    triton_path = use_triton(backend, hidden)
    hidden_2d = hidden.reshape(-1, H)  # [N, H]
    rows = counted.reshape(-1).nonzero().squeeze(1)  # [Nv] counted rows
    chunk = _chunk_rows(rows.numel(), V, H, chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, entropy = _FusedLinearTokenLogprobsFunction.apply(
            hidden_2d, weight, bias, labels.reshape(-1), rows, float(temperature), int(ignore_index),
            bool(return_entropy), chunk, triton_path, transform,
        )  # fmt: skip
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, entropy.view(labels.shape)
    return logp


def fused_linear_ppo_loss(
    hidden, weight, labels, old_logp, advantages, mask, bias=None, clip_eps=0.2, clip_eps_high=None,
    temperature=1.0, chunk_size=None, backend=None, logit_scale: float = 1.0,
    logit_softcap: float | None = None,
):  # fmt: skip
    """ppo_policy_loss(z, ...) with z = transform(hidden @ weight^T + bias), never more than
    [chunk, V] logits.

    hidden: [N, H] (or [..., H]); weight [V, H], bias [V] or None, same dtype as hidden;
    labels [N] int64, old_logp and advantages [N] detached floats, mask [N] bool (or int / float
    {0, 1}); the rest as in `ppo_policy_loss`; logit_scale, logit_softcap: the model's logit
    transform, as in `fused_linear_token_logprobs`. Gradients for hidden, and for weight / bias
    when they require grad, are computed during the forward; backward only scales them. Rows where
    mask is False are never multiplied. Returns (loss [] fp32, {"clip_frac", "approx_kl",
    "entropy"} detached fp32 scalars). Two host syncs: the label check and the row gather (a
    third for a non-bool mask: its values are checked).
    """
    hidden, weight, bias = _prepare_linear(hidden, weight, bias, chunk_size)
    V, H = weight.shape
    mask = check_policy_args(
        "hidden", hidden, V, labels, old_logp, advantages, mask, clip_eps, clip_eps_high, temperature
    )
    transform = check_transform(logit_scale, logit_softcap)
    triton_path = use_triton(backend, hidden)
    hidden_2d = hidden.reshape(-1, H)  # [N, H]
    mask_1d = mask.reshape(-1)  # [N]
    rows = mask_1d.nonzero().squeeze(1)  # [Nv] counted rows
    n_valid = mask_1d.sum().clamp(min=1).to(compute_dtype(hidden))  # []
    with torch.autocast(hidden.device.type, enabled=False):
        loss, stats = _FusedLinearPPOLossFunction.apply(
            hidden_2d, weight, bias, labels.reshape(-1), old_logp.reshape(-1), advantages.reshape(-1),
            rows, n_valid, float(temperature), float(clip_eps),
            float(clip_eps if clip_eps_high is None else clip_eps_high),
            _chunk_rows(rows.numel(), V, H, chunk_size), _needs_grad(hidden, weight, bias), triton_path,
            transform,
        )  # fmt: skip
    return loss, {"clip_frac": stats[0], "approx_kl": stats[1], "entropy": stats[2]}
