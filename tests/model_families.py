"""Tiny random-weight models of the families users bring, for tests/test_model_families.py.

Each is built from its transformers config (2 layers, hidden 32, the conftest word-level vocabulary)
and saved with its tokenizer, so RoleModel loads it through the same `from_pretrained(path)` a
downloaded model takes. Logit transforms are set larger than the families ship (Gemma's softcap 30
would be inert on logits of size 1) so a dropped transform shows in every comparison.
"""

from __future__ import annotations

from pathlib import Path

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def family_config(family: str, vocab_size: int, ids: dict):
    """The transformers config of a tiny `family` model."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, **SMALL, **ids)
    if family == "qwen2":  # tied embeddings
        return tf.Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, **SMALL, **ids)
    if family == "qwen3":
        return tf.Qwen3Config(vocab_size=vocab_size, head_dim=8, tie_word_embeddings=True, **SMALL, **ids)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(vocab_size=vocab_size, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, decoder_sparse_step=1, norm_topk_prob=True, **SMALL, **ids)
    if family == "mistral":
        return tf.MistralConfig(vocab_size=vocab_size, head_dim=8, **SMALL, **ids)
    if family == "gemma2":  # final softcap (ships 30), attention softcap, sliding window
        return tf.Gemma2Config(vocab_size=vocab_size, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=2.0,
                               sliding_window=4, **SMALL, **ids)
    if family == "gemma3":  # the text model (Gemma3ForCausalLM)
        return tf.Gemma3TextConfig(vocab_size=vocab_size, head_dim=8, query_pre_attn_scalar=8,
                                   final_logit_softcapping=2.0, sliding_window=4, **SMALL, **ids)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(vocab_size=vocab_size, **SMALL, **ids)
    if family == "gpt2":  # Conv1D projections, no pad token
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5, **ids)
    if family == "opt":  # fc1/fc2 see [B * S, H]
        return tf.OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32, **ids)
    if family == "cohere":  # logit_scale (ships 0.0625)
        return tf.CohereConfig(vocab_size=vocab_size, logit_scale=0.5, **SMALL, **ids)
    if family == "granite":  # logits divided by logits_scaling
        return tf.GraniteConfig(vocab_size=vocab_size, logits_scaling=4.0, embedding_multiplier=2.0,
                                residual_multiplier=0.5, attention_multiplier=0.25, **SMALL, **ids)
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox",
            "opt", "cohere", "granite")
NO_PAD_FAMILIES = {"gpt2"}  # saved without a pad token, as GPT-2 ships


def write_family_model(family: str, out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(with_pad=family not in NO_PAD_FAMILIES)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, len(tokenizer), ids))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
