"""The family's own map from the LM head's output to its logits, for the fused log-prob kernels.

The fused kernels compute logits as `hidden @ W.T + b` chunk by chunk, but some families transform
them after the LM head, and sampling (the model's real forward) sees the transformed logits: left
out, rollouts and training would disagree by nats per token. The kernels take the transform as
`z = (hidden @ W.T + b) * logit_scale`, then `z = logit_softcap * tanh(z / logit_softcap)` when a
softcap is set, then `/ temperature`. The config fields that set it:

    final_logit_softcapping   Gemma 2, Gemma 3            logit_softcap
    logit_scale               Cohere, Cohere 2            logit_scale (multiplied)
    logits_scaling            Granite, Granite MoE        logit_scale = 1 / logits_scaling (divided)
    lm_head_multiplier        Falcon-H1                   logit_scale (multiplied)

Any other family is checked at load time (`check_logits_reproduced`): its logits must equal the
transform of the decoder body's output, or the model is refused with a one-line ModelError rather
than trained on log-probs that differ from what it samples.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf.errors import ModelError

# probe length for check_logits_reproduced: a few positions exercise attention, rotary, norms
_PROBE_TOKENS = 8


def logit_transform_of(config) -> dict[str, float]:
    """The fused kernels' `logit_scale` / `logit_softcap` kwargs for this transformers config;
    only the entries that differ from the identity (scale 1, no softcap), so `{}` for most families."""
    transform: dict[str, float] = {}
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    if getattr(config, "lm_head_multiplier", None) is not None:
        scale *= float(config.lm_head_multiplier)
    if scale != 1.0:
        transform["logit_scale"] = scale
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:  # None or 0 mean no softcap in transformers
        transform["logit_softcap"] = float(softcap)
    return transform


def apply_logit_transform(logits: torch.Tensor, logit_scale: float = 1.0, logit_softcap: float | None = None
                          ) -> torch.Tensor:
    """The transform on materialised logits (reference for tests and for the load-time check)."""
    logits = logits * logit_scale
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits


@torch.no_grad()
def check_logits_reproduced(causal_lm: nn.Module, decoder: nn.Module, transform: dict[str, float],
                            device: torch.device) -> None:
    """Refuse a model whose logits are not `transform(decoder_output @ W.T + b)` on a short probe."""
    head = causal_lm.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ModelError(f"{type(causal_lm).__name__} has no LM head weight to compute log-probs with")
    vocab_size = head.weight.shape[0]
    input_ids = (torch.arange(_PROBE_TOKENS, device=device) % vocab_size)[None]  # [1, S]
    attention_mask = torch.ones_like(input_ids)  # [1, S]
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        logits = causal_lm(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # [1, S, V]
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    finally:
        causal_lm.train(was_training)
    ours = hidden.float() @ head.weight.float().T  # [1, S, V]
    if getattr(head, "bias", None) is not None:
        ours = ours + head.bias.float()
    ours = apply_logit_transform(ours, **transform)
    # bf16 logits carry ~0.4% rounding; a missed scale, cap or bias is far larger on real weights
    tolerance = 1e-3 + 2e-2 * float(logits.abs().max())
    difference = float((ours - logits).abs().max())
    if not difference <= tolerance:
        model_type = getattr(causal_lm.config, "model_type", type(causal_lm).__name__)
        raise ModelError(
            f"model type {model_type!r} is not supported: its logits are not the LM head's output with a "
            f"scale or softcap we know (max difference {difference:.3g}); see rlhf/models/logit_transform.py"
        )
