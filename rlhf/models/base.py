"""The shared base: load a causal LM once (4-bit NF4 or unquantized), frozen, dropout off.

The model comes from a local Hugging Face directory, a Hub id (resolved by `from_pretrained` itself,
so its cache and HF_HUB_OFFLINE work as usual) or a `.gguf` file (converted once, see gguf_import.py).
Also what depends only on the base: its tokenizer (its own pad token, which may be the EOS), the
decoder body whose output is the LM head's input, and the LoRA settings that fit its architecture.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path

import torch
from peft import LoraConfig
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from rlhf.config import looks_like_hub_id
from rlhf.errors import ConfigError, ModelError
from rlhf.models.config import ModelConfig
from rlhf.models.gguf_import import converted_gguf_dir

log = logging.getLogger("rlhf.models")

# LoRA targets for target_modules="auto": every attention and MLP projection (QLoRA: adapting all
# linear layers is what matches full fine-tuning). MoE families: attention and the shared expert's
# projections; the routed experts only when named (peft wraps them as parameters, without dropout
# or the row-mixed forward). Families not listed fall back to "all-linear".
_LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_STYLE_TARGETS,
    "mistral": _LLAMA_STYLE_TARGETS,
    "qwen2": _LLAMA_STYLE_TARGETS,
    "qwen3": _LLAMA_STYLE_TARGETS,
    "gemma": _LLAMA_STYLE_TARGETS,
    "gemma2": _LLAMA_STYLE_TARGETS,
    "gemma3_text": _LLAMA_STYLE_TARGETS,
    "cohere": _LLAMA_STYLE_TARGETS,
    "granite": _LLAMA_STYLE_TARGETS,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused q/k/v and gate/up
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # c_proj names both the attention output and the MLP output
    "qwen3_moe": _ATTENTION_TARGETS,  # no shared expert
    "qwen2_moe": _ATTENTION_TARGETS + ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"),
    "mixtral": _ATTENTION_TARGETS,
}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_model_source(path: str | Path) -> tuple[str, bool]:
    """(what `from_pretrained` is given, whether it is local) for a model path, or a one-line ModelError.

    A local directory needs config.json; a `.gguf` file becomes its converted directory; anything else
    that reads as a Hub id ("org/name") goes to `from_pretrained` as is, which downloads it or (with
    HF_HUB_OFFLINE=1) finds it in the HF cache.
    """
    if not str(path):
        raise ModelError("model.path is required: a local Hugging Face directory, a .gguf file or a Hub id (--model)")
    model_path = Path(path)
    if model_path.suffix == ".gguf":
        return str(converted_gguf_dir(model_path)), True
    if model_path.is_dir():
        if not (model_path / "config.json").is_file():
            raise ModelError(f"model path '{path}' has no config.json (expected a Hugging Face model directory)")
        return str(model_path), True
    if model_path.exists():
        raise ModelError(f"model path '{path}' is a file; expected a Hugging Face model directory or a .gguf file")
    if looks_like_hub_id(str(path)):
        return str(path), False
    raise ModelError(f"model path '{path}' does not exist (expected a local Hugging Face model directory with "
                     "config.json, a .gguf file or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)")


def _not_loadable(path: str | Path, what: str, err: Exception) -> ModelError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelError(f"cannot load {what} from '{path}': {first_line}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or "auto": cuda when available, else cpu. The one device resolver (models, stages, eval)."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: '{device}' requested but CUDA is not available; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # device_map needs an index
    return device


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bf16 on CUDA (fp16 overflows without loss scaling), fp32 on CPU (no fast bf16 matmuls)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_tokenizer(path: str | Path):
    """The base's tokenizer with its own pad token, which may be the EOS (SmolLM2, Qwen2: `<|im_end|>`).

    No token is ever added: a new `<pad>` row would grow the LM head's softmax by one entry and shift
    every log-prob, and adapters trained over the grown base would not load on the model as shipped.
    A tokenizer without a pad (GPT-2) pads with its EOS. Pad == EOS is safe because nothing reads
    token identity to find padding: every mask comes from lengths (rlhf.data.collate) or from the
    first sampled EOS (rlhf.ppo.rollout), so the EOS that ends an answer counts as a real token in
    SFT labels, policy log-probs and the RM's last-token score.
    """
    source, local = resolve_model_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:
        raise _not_loadable(path, "a tokenizer", err) from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer in '{path}' has no EOS token: answers could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer in %s has no pad token: padding with its EOS %r (masks never read token ids)",
                 path, tokenizer.eos_token)
    return tokenizer


def load_base_model(cfg: ModelConfig, tokenizer, device: torch.device) -> PreTrainedModel:
    """`from_pretrained` on the model source, NF4 or unquantized, every parameter frozen, dropout off."""
    source, local = resolve_model_source(cfg.path)
    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    kwargs = {"local_files_only": local, "dtype": compute_dtype}
    if cfg.quantization == "nf4":
        # QLoRA's recipe: NF4 storage, double quantization of the scales, matmuls in compute_dtype.
        # The embeddings and LM head stay unquantized (bitsandbytes skips the output layer).
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": device}  # quantization happens as the weights land on the device
    try:
        with _no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise _not_loadable(cfg.path, "a causal LM", err) from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met a pickle that is more than tensors
        raise ModelError(f"cannot load a causal LM from '{cfg.path}': its pytorch_model.bin holds more than "
                         "plain weights (a pickle that could run code), so it was not loaded; use a "
                         "model.safetensors copy of the model") from None
    if cfg.quantization == "none":
        model.to(device)
    else:
        _keep_one_cpu_nf4_path(model)

    _check_vocabulary_fits(model, tokenizer, cfg.path)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _turn_off_dropout(model)
    model.requires_grad_(False)
    return model


def _check_vocabulary_fits(model: PreTrainedModel, tokenizer, path: str) -> None:
    """The embeddings are used as shipped (never resized: see load_tokenizer); the special tokens we
    feed the model (BOS, EOS, pad) must have rows, and a tokenizer larger than the embeddings is noted."""
    rows = model.get_input_embeddings().weight.shape[0]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name)
        if token_id is not None and token_id >= rows:
            raise ModelError(f"'{path}': the tokenizer's {name[:-3]} id {token_id} has no embedding row "
                             f"(the model has {rows}); the tokenizer does not match the model")
    if len(tokenizer) > rows:
        log.warning("'%s': the tokenizer has %d tokens but the model only %d embedding rows; ids past %d "
                    "cannot be used", path, len(tokenizer), rows, rows - 1)


@contextlib.contextmanager
def _no_loading_bar():
    """Hide transformers' "Loading weights" bar for one load: a run loads the base once per stage (six
    bars per demo, each a long carriage-return line in a log file); the stage's own progress says more."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _keep_one_cpu_nf4_path(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking NF4 weights for its AVX512-BF16 CPU inference kernel.

    On CPUs with AVX512-BF16, a Linear4bit forward in eval mode without grad rewrites its weight in
    place (new storage, bf16 scales) and from then on uses a kernel with no backward. Rollout scoring
    runs exactly so, then PPO trains through the same layers: the scores would drift from the
    training forward (PPO ratio != 1 at the first step), the weights' storage would change under us,
    and layers narrower than the 64-wide quantization block fail outright. One path for both.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _turn_off_dropout(model: nn.Module) -> None:
    """Dropout off in the base for good (InstructGPT: no dropout in policy, reference, reward, value).

    Zeroed at the source rather than relying on eval(): training forwards run in train mode (gradient
    checkpointing only works there) and must still be deterministic. Attention dropout lives in
    nn.Dropout modules (GPT-2) or in float attributes read at forward time (Llama's
    `attention_dropout`), so both are zeroed, as are the config's values. LoRA dropout is attached
    later by peft and follows `ModelConfig.lora_dropout`.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    for name, value in model.config.to_dict().items():
        if ("dropout" in name or name.endswith("_pdrop")) and isinstance(value, float):
            setattr(model.config, name, 0.0)


def decoder_body(model: PreTrainedModel) -> nn.Module:
    """The transformer under the LM head; its `last_hidden_state` is the final-norm output.

    `base_model_prefix` names it for every causal LM in transformers ("model" for Llama and Qwen2,
    "transformer" for GPT-2), so calling it skips the [B, S, V] logits the full forward would build.
    """
    body = getattr(model, model.base_model_prefix, None)
    if not isinstance(body, nn.Module):
        raise ModelError(f"{type(model).__name__}: cannot find its decoder body '{model.base_model_prefix}'")
    return body


def lora_target_modules(model: PreTrainedModel, setting: str | list[str]) -> str | list[str]:
    """Resolve ModelConfig.target_modules for this base: a list of module names, or "all-linear"."""
    if setting != "auto":
        return list(setting) if isinstance(setting, (list, tuple)) else setting
    preset = LORA_TARGETS_BY_MODEL_TYPE.get(model.config.model_type)
    if preset is None:
        log.info("no LoRA target preset for model type %r; using all-linear", model.config.model_type)
        return "all-linear"
    names = [name for name, _ in model.named_modules()]
    targets = [target for target in preset if _matches(target, names)]
    return targets or "all-linear"


def has_conv1d(model: nn.Module) -> bool:
    """GPT-2 stores its projections as Conv1D ([in, out] weights), which LoRA must know
    (`fan_in_fan_out`). NF4 loading converts them to Linear4bit, so look at the loaded modules."""
    return any(isinstance(module, Conv1D) for module in model.modules())


def _matches(target: str, names: list[str]) -> bool:
    """peft's rule: a target matches a dotted name that is it or ends with "." + it."""
    return any(name == target or name.endswith("." + target) for name in names)


def split_expert_parameters(model: PreTrainedModel, targets: str | list[str]) -> tuple[str | list[str], list[str]]:
    """(module targets, parameter targets): names in an explicit list that match no module but a
    parameter (MoE experts stored as one [experts, ...] tensor, e.g. Qwen3-MoE's
    `experts.gate_up_proj`) go to peft's `target_parameters`."""
    if not isinstance(targets, list):
        return targets, []
    # once peft wrapped a layer, its original weights sit under ".base_layer"
    module_names = [name.replace(".base_layer", "") for name, _ in model.named_modules()]
    parameter_names = [name.replace(".base_layer", "") for name, _ in model.named_parameters()]
    parameters = [t for t in targets if not _matches(t, module_names) and _matches(t, parameter_names)]
    return [t for t in targets if t not in parameters], parameters


def new_lora_config(cfg: ModelConfig, model: PreTrainedModel) -> LoraConfig:
    """A fresh adapter's LoRA settings for this base (standard init: B = 0, so it starts as the base)."""
    modules, parameters = split_expert_parameters(model, lora_target_modules(model, cfg.target_modules))
    if parameters and cfg.lora_dropout != 0:
        raise ModelError(
            f"model.target_modules names expert parameters {parameters}, which peft adapts without dropout: "
            f"set model.lora_dropout 0 (got {cfg.lora_dropout}) or leave the experts out"
        )
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=modules or None,
        target_parameters=parameters or None,
        fan_in_fan_out=has_conv1d(model),
        bias="none",  # adapters add no biases, so disabling them gives the base exactly
        task_type="CAUSAL_LM",  # so PeftModel.from_pretrained(base, dir) rebuilds a PeftModelForCausalLM
    )
