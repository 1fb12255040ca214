"""The row-mixed forward: several roles over one stack of rows, the shared base run once.

PPO's update runs the rollout rows through the policy and the value roles, and pretraining rows
through the policy. peft can mix adapters within one batch (`adapter_names`) only at inference and
through list-indexed copies that cost more than they save. Here the parts are stacked into one
batch, every LoRA layer's adapters are hidden (the layer returns its base output), and a forward
hook on each LoRA layer adds each role's low-rank update to its own rows: the arithmetic of peft's
LoRA Linear, `base + lora_B(lora_A(dropout(x))) * scaling`, per slice of rows.

A layer sees its rows either as [R, S, in] (most projections) or flattened as [R * S, in] (OPT's
fc1/fc2, MoE shared experts): a part's slice is then its rows times the sequence length. A layer
whose input is neither (tokens gathered per MoE expert) cannot be split by rows; the hook raises
`RowsNotAligned` and the caller falls back to one forward per part.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# a part is padded to share a forward only if it has at least this fraction of the longest part's
# length: padding more would cost more tokens than one pass of per-layer work saves
PAD_TO_SHARE = 0.8


class RowRoles(tuple):
    """((role, start, stop), ...): which role's adapter applies to which rows of one forward of
    `seq_len` positions."""

    seq_len: int

    def __new__(cls, rows, seq_len: int):
        new = super().__new__(cls, rows)
        new.seq_len = seq_len
        return new

    def __eq__(self, other):
        return isinstance(other, RowRoles) and tuple(self) == tuple(other) and self.seq_len == other.seq_len

    __hash__ = tuple.__hash__


class RowsNotAligned(RuntimeError):
    """A LoRA layer's input is not the stacked rows (e.g. tokens gathered per MoE expert)."""


def group_parts(lengths: list[int]) -> list[list[int]]:
    """Indices of parts that share a forward, longest first: each group's parts are within
    PAD_TO_SHARE of its longest one."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[index] >= PAD_TO_SHARE * lengths[groups[-1][0]]:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def stack_parts(parts: list[tuple[str, torch.Tensor, torch.Tensor]], pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor, RowRoles]:
    """Stack the parts' rows, the shorter ones right-padded (causal attention: real tokens never see
    that padding). -> (input_ids [R, L], attention_mask [R, L] long, RowRoles)."""
    length = max(input_ids.shape[1] for _, input_ids, _ in parts)
    all_ids, all_masks, rows, start = [], [], [], 0
    for role, input_ids, attention_mask in parts:
        padding = (0, length - input_ids.shape[1])
        all_ids.append(F.pad(input_ids, padding, value=pad_id))  # [b, L]
        all_masks.append(F.pad(attention_mask.to(torch.long), padding, value=0))  # [b, L]
        rows.append((role, start, start + input_ids.shape[0]))
        start += input_ids.shape[0]
    return torch.cat(all_ids), torch.cat(all_masks), RowRoles(rows, length)


def unstack_parts(hidden: torch.Tensor, rows: RowRoles, lengths: list[int]) -> list[torch.Tensor]:
    """[R, L, H] -> each part's [b, S_part, H]; split, not slices: no zero-filled gradients."""
    pieces = hidden.split([stop - start for _, start, stop in rows])
    return [piece[:, :length] for piece, length in zip(pieces, lengths)]


def add_row_deltas(rows: RowRoles, layer: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """`output` (the layer's base output for input `x`) plus each role's LoRA update on its rows.

    x: [R, S, in] or [R * S, in]; output: the same leading shape with `out` features.
    """
    sizes = _row_sizes(rows, x)
    convert = not torch.is_autocast_enabled()  # as peft: LoRA runs in its weights' dtype unless autocast
    # split, not slice: a slice's backward writes its gradient into a zero-filled full-size tensor,
    # split's backward concatenates the pieces
    parts = []
    for (role, _, _), x_rows, base in zip(rows, x.split(sizes), output.split(sizes)):
        if role not in layer.lora_A:  # this adapter does not target this module
            parts.append(base)
            continue
        lora_A, lora_B = layer.lora_A[role], layer.lora_B[role]
        x_rows = x_rows.to(lora_A.weight.dtype) if convert else x_rows  # [..., in]
        low_rank = lora_A(layer.lora_dropout[role](x_rows))  # [..., r]
        # base + scaling * low_rank @ B^T as one GEMM: no separate full-width multiply and add
        part = torch.addmm(base.reshape(-1, base.shape[-1]).to(low_rank.dtype),
                           low_rank.reshape(-1, low_rank.shape[-1]), lora_B.weight.t(), alpha=layer.scaling[role])
        parts.append(part.view_as(base).to(output.dtype))  # [..., out]
    return torch.cat(parts)


def _row_sizes(rows: RowRoles, x: torch.Tensor) -> list[int]:
    """How many leading entries of `x` belong to each part."""
    total_rows = rows[-1][2]
    if x.dim() >= 3 and x.shape[0] == total_rows and x.shape[1] == rows.seq_len:
        return [stop - start for _, start, stop in rows]  # [R, S, in]
    if x.dim() == 2 and x.shape[0] == total_rows * rows.seq_len:
        return [(stop - start) * rows.seq_len for _, start, stop in rows]  # [R * S, in], row-major
    raise RowsNotAligned(
        f"LoRA layer input {tuple(x.shape)} is neither [{total_rows}, {rows.seq_len}, ...] nor "
        f"[{total_rows * rows.seq_len}, ...]"
    )
