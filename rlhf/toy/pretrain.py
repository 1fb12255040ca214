"""Pretrain the toy world's base model: a tiny Llama from random init on `pretrain.jsonl` texts.

A plain torch loop: each text is `<bos> text <eos>`, batches are right-padded (loss on real tokens
only), AdamW with linear warm-up then cosine decay to `min_lr_ratio` of the peak. The loss reported
before and after is the mean next-token NLL over a fixed probe set of texts, so the two are
comparable (the per-step training loss moves with each batch's mix).
"""

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from rlhf.progress import progress
from rlhf.toy.config import ToyConfig

logger = logging.getLogger(__name__)

N_PROBE_TEXTS = 256  # ours: enough texts for a steady loss estimate, ~0.1 s to evaluate
LOG_EVERY = 20  # ours: steps between metrics lines


@dataclass(frozen=True)
class PretrainStats:
    loss_start: float  # probe NLL per token at random init (about ln V)
    loss_end: float  # probe NLL per token after the last step
    steps: int
    n_params: int
    train_time_s: float


def make_base_model(cfg: ToyConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama over the toy vocabulary, seeded by `cfg.seed`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,  # a separate LM head: the RM replaces it, the fused kernels read it
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    # generate() stops at <eos> and pads with <pad> without extra arguments
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _collate(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (input_ids [B, S], mask [B, S] bool, True = a real token)."""
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(sequences), length), dtype=torch.bool)  # [B, S]
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = True
    return input_ids, mask


def _nll(model: LlamaForCausalLM, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL over real target tokens, their count) for one batch."""
    logits = model(input_ids=input_ids, attention_mask=mask.long()).logits[:, :-1]  # [B, S-1, V]
    targets, target_mask = input_ids[:, 1:], mask[:, 1:]  # [B, S-1]
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, S-1]
    return (nll * target_mask).sum(), target_mask.sum()


@torch.no_grad()
def probe_loss(model: LlamaForCausalLM, sequences: list[list[int]], pad_id: int, batch_size: int = 64) -> float:
    """Mean next-token NLL per token over `sequences` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros(()), torch.zeros(())
    for start in range(0, len(sequences), batch_size):
        batch_nll, batch_count = _nll(model, *_collate(sequences[start : start + batch_size], pad_id))
        total, count = total + batch_nll, count + batch_count
    model.train(was_training)
    return (total / count).item()


def lr_at(step: int, cfg: ToyConfig) -> float:
    """Linear warm-up to `cfg.lr`, then cosine decay to `cfg.min_lr_ratio * cfg.lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.pretrain_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain_base(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, cfg: ToyConfig, metrics_path: Path | None = None
) -> tuple[LlamaForCausalLM, PretrainStats]:
    """Train a fresh tiny Llama on `texts` for `cfg.pretrain_steps` steps; returns it (eval mode) and stats.

    With `metrics_path`, appends one `{"step", "train_loss", "lr"}` line every LOG_EVERY steps.
    """
    model = make_base_model(cfg, tokenizer)
    sequences = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]  # <bos> text <eos>
    longest = max(len(seq) for seq in sequences)
    assert longest <= cfg.max_position_embeddings, f"a toy text has {longest} tokens"  # validate() bounds it
    probe = sequences[:N_PROBE_TEXTS]
    loss_start = probe_loss(model, probe, tokenizer.pad_token_id)

    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on norms (nanoGPT's rule)
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(cfg.seed)  # data order, independent of the global RNG
    order, cursor = torch.randperm(len(sequences), generator=generator), 0
    metrics = metrics_path.open("a") if metrics_path is not None else None
    model.train()
    start_time = time.perf_counter()
    bar = progress(range(cfg.pretrain_steps), desc="toy pretrain", unit="step", dynamic_ncols=True)
    for step in bar:
        if cursor + cfg.batch_size > len(order):  # a fresh shuffle each pass over the corpus
            order, cursor = torch.randperm(len(sequences), generator=generator), 0
        batch = [sequences[i] for i in order[cursor : cursor + cfg.batch_size].tolist()]
        cursor += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)

        batch_nll, batch_count = _nll(model, *_collate(batch, tokenizer.pad_token_id))
        loss = batch_nll / batch_count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        if step % LOG_EVERY == 0 or step == cfg.pretrain_steps - 1:
            train_loss = loss.item()  # a sync point, once per log step
            bar.set_postfix(loss=f"{train_loss:.3f}")
            if metrics is not None:
                metrics.write(json.dumps({"step": step, "train_loss": train_loss, "lr": lr_at(step, cfg)}) + "\n")
                metrics.flush()
    train_time_s = time.perf_counter() - start_time
    if metrics is not None:
        metrics.close()

    model.eval()
    stats = PretrainStats(
        loss_start=loss_start,
        loss_end=probe_loss(model, probe, tokenizer.pad_token_id),
        steps=cfg.pretrain_steps,
        n_params=sum(p.numel() for p in model.parameters()),
        train_time_s=train_time_s,
    )
    logger.info("toy pretraining: probe loss %.3f -> %.3f in %d steps (%.1f s)",
                stats.loss_start, stats.loss_end, stats.steps, stats.train_time_s)
    return model, stats
