"""Where `--model` comes from: a local Hugging Face directory, a Hub id (plain `from_pretrained`
resolution: the HF cache and HF_HUB_OFFLINE work as usual), or a `.gguf` file converted once beside it.

Never online: the Hub-id test builds an HF cache by hand and runs with HF_HUB_OFFLINE=1 in a fresh
process (huggingface_hub reads that variable at import). The conversion itself runs on the real
SmolLM2 file in tests/test_real_model.py; here a stand-in converter checks when it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rlhf.models.gguf_import as gguf_import
from rlhf.cli import main as cli_main
from rlhf.config import looks_like_hub_id, require_model_source
from rlhf.errors import ConfigError, ModelError
from rlhf.models import load_tokenizer
from rlhf.models.base import resolve_model_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value,is_hub_id", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("gpt2", True), ("Qwen/Qwen2.5-0.5B-Instruct", True),
    ("./models/x", False), ("/abs/path", False), ("a/b/c", False), ("../x", False), ("x.gguf", False),
    ("org/../x", False), ("", False),
])
def test_what_reads_as_a_hub_id(value, is_hub_id):
    assert looks_like_hub_id(value) is is_hub_id


def test_missing_local_paths_are_one_line_errors(tmp_path):
    nope = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"model.path \(--model\): model '{nope}' does not exist \(expected a"):
        require_model_source(str(nope), "model.path")
    with pytest.raises(ModelError, match=rf"model path '{nope}' does not exist \(expected a local Hugging Face"):
        resolve_model_source(nope)
    with pytest.raises(ModelError, match=r"GGUF file '.*missing\.gguf' does not exist"):
        resolve_model_source(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        resolve_model_source(tmp_path / "empty")
    require_model_source("HuggingFaceTB/SmolLM2-135M-Instruct", "model.path")  # left to from_pretrained


def test_local_dir_is_local_only_and_hub_id_is_not(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    assert resolve_model_source(model_dir) == (str(model_dir), True)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", False)


def write_hf_cache(cache: Path, repo_id: str, model_dir: Path) -> None:
    """The layout huggingface_hub writes when it downloads `repo_id` (one snapshot, refs/main)."""
    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


@pytest.mark.slow
def test_hub_id_loads_from_the_hf_cache_offline(tiny_model_dir, tmp_path):
    cache = tmp_path / "hub"
    write_hf_cache(cache, "acme/tiny-llama", tiny_model_dir("llama"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    script = ("from rlhf.models import ModelConfig, RoleModel\n"
              "model = RoleModel(ModelConfig(path='acme/tiny-llama', quantization='none'), device='cpu')\n"
              "print('eos', model.tokenizer.eos_token, 'rows', model.lm_head_weight.shape[0])\n"
              "from rlhf.models import load_tokenizer\n"
              "try:\n    load_tokenizer('acme/not-cached')\n"
              "except Exception as err:\n    print(type(err).__name__, str(err).count(chr(10)), err)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "eos <eos> rows" in lines[0]
    # not in the cache and offline: our one-line error naming the id
    assert lines[1].startswith("ModelError 0 cannot load a tokenizer from 'acme/not-cached'")


@pytest.fixture
def fake_converter(monkeypatch, tiny_model_dir):
    """Replace the GGUF reader with a copy of a tiny model dir; records each conversion."""
    calls = []

    def write(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        shutil.copytree(tiny_model_dir("llama"), out_dir, dirs_exist_ok=True)
        (out_dir / gguf_import.SOURCE_RECORD).write_text(json.dumps(gguf_import._source_stamp(gguf_path)))

    monkeypatch.setattr(gguf_import, "_write_hf_dir", write)
    return calls


def test_gguf_model_path_is_converted_once_beside_the_file(tmp_path, fake_converter):
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF v1")
    source, local = resolve_model_source(gguf_file)
    assert (source, local) == (str(tmp_path / "tiny.hf"), True) and len(fake_converter) == 1
    assert (tmp_path / "tiny.hf" / "config.json").is_file()
    assert load_tokenizer(gguf_file).eos_token == "<eos>"  # the stages load it like any directory
    assert len(fake_converter) == 1  # reused: the file has not changed
    gguf_file.write_bytes(b"GGUF v2, changed")
    resolve_model_source(gguf_file)
    assert len(fake_converter) == 2  # changed: converted again
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_import_gguf_command(tmp_path, fake_converter, capsys):
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF")
    out = tmp_path / "out"
    assert cli_main(["import-gguf", str(gguf_file), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and f"--model {out}" in capsys.readouterr().out
    assert cli_main(["import-gguf", str(gguf_file), "--out", str(out)]) == 2
    assert "exists and is not empty; choose another or pass --overwrite" in capsys.readouterr().err
    assert cli_main(["import-gguf", str(gguf_file), "--out", str(out), "--overwrite"]) == 0
    assert cli_main(["import-gguf", str(tmp_path / "none.gguf"), "--out", str(out)]) == 2
    assert "GGUF file" in capsys.readouterr().err and len(fake_converter) == 2


def test_a_tokenizer_whose_special_tokens_have_no_embedding_row_is_refused(tiny_model_dir, tmp_path):
    # the embeddings are never resized, so a pad added to the tokenizer alone cannot be fed to the model
    source_dir = tiny_model_dir("llama")
    tokenizer = load_tokenizer(source_dir)
    tokenizer.add_special_tokens({"pad_token": "<extra-pad>"})
    tokenizer.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source_dir / name, tmp_path / name)
    from rlhf.models import ModelConfig, RoleModel

    with pytest.raises(ModelError, match=r"the tokenizer's pad_token id \d+ has no embedding row \(the model has"):
        RoleModel(ModelConfig(path=str(tmp_path), quantization="none"), device="cpu")
