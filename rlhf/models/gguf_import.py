"""A `.gguf` file -> a plain Hugging Face model directory (`rlhf import-gguf FILE.gguf --out DIR`).

transformers reads GGUF through the `gguf` package (`from_pretrained(dir, gguf_file=NAME)`),
dequantizing every tensor to float. The loaded model keeps a `quantization_config` (quant_method
"gguf") that makes `save_pretrained` refuse it, so the model is rebuilt from its config without that
entry and the state dict is loaded into the rebuilt one: what is written is an ordinary directory
(safetensors weights, tokenizer with its chat template, generation config) that every stage, peft
and `from_pretrained` read like any downloaded model. Adapters trained over it load on it unchanged.

A `.gguf` given to `--model` goes through the same code once: it is converted into `<FILE>.hf/`
beside the file, and reused while the file's size and modification time are the ones recorded there.

Heavy imports (torch, transformers) happen inside the functions, so the CLI's `--help` stays quick.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import ConfigError, ModelError

log = logging.getLogger("rlhf.models")

SOURCE_RECORD = "gguf_source.json"  # in a converted dir: which file (size, mtime) it was made from
CACHE_SUFFIX = ".hf"  # FILE.gguf -> FILE.hf/ beside it


@dataclass
class ImportGGUFConfig:
    gguf: str = ""  # the .gguf file (also the first positional argument: `rlhf import-gguf FILE.gguf`)
    out_dir: str = ""  # the Hugging Face directory to write
    overwrite: bool = False  # replace an existing non-empty out_dir

    def validate(self) -> None:
        if not self.gguf:
            raise ConfigError("gguf: a .gguf file is required (rlhf import-gguf FILE.gguf --out DIR)")
        if not self.out_dir:
            raise ConfigError("out_dir: an output directory is required (rlhf import-gguf FILE.gguf --out DIR)")


def import_gguf_from_config(cfg: ImportGGUFConfig) -> Path:
    out_dir = import_gguf(cfg.gguf, cfg.out_dir, overwrite=cfg.overwrite)
    print(f"wrote a Hugging Face model directory to {out_dir} (use it as --model {out_dir})")
    return out_dir


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert `gguf_path` into the HF directory `out_dir` (written atomically); returns `out_dir`."""
    gguf_path, out_dir = _check_gguf_file(gguf_path), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ModelError(f"output directory '{out_dir}' exists and is not empty; choose another or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared model directory
    try:
        _write_hf_dir(gguf_path, tmp_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("converted %s into the Hugging Face directory %s", gguf_path, out_dir)
    return out_dir


def converted_gguf_dir(gguf_path: str | os.PathLike) -> Path:
    """The HF directory for a `.gguf` given as a model path: `<FILE>.hf/` beside it, converted on first use.

    Reconverted when the file changed (size or mtime differ from the record). Two processes converting
    at once each write their own temp dir; the last rename wins and both results are the same.
    """
    gguf_path = _check_gguf_file(gguf_path)
    cache_dir = gguf_path.with_name(gguf_path.stem + CACHE_SUFFIX)
    record = cache_dir / SOURCE_RECORD
    if record.is_file() and json.loads(record.read_text()) == _source_stamp(gguf_path):
        return cache_dir
    if not os.access(gguf_path.parent, os.W_OK):
        raise ModelError(f"cannot write the converted model beside '{gguf_path}' (read-only directory); run "
                         f"`rlhf import-gguf {gguf_path} --out DIR` and pass --model DIR")
    log.info("converting %s once into %s (reused while the file is unchanged)", gguf_path, cache_dir)
    return import_gguf(gguf_path, cache_dir, overwrite=True)


def _check_gguf_file(gguf_path: str | os.PathLike) -> Path:
    path = Path(gguf_path)
    if path.suffix != ".gguf":
        raise ModelError(f"'{path}' is not a .gguf file")
    if not path.is_file():
        raise ModelError(f"GGUF file '{path}' does not exist")
    return path.absolute()  # not resolve(): a symlinked file converts beside the link, where it was given


def _source_stamp(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {"gguf": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_hf_dir(gguf_path: Path, out_dir: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; say so before it fails deeper down)
    except ImportError:
        raise ModelError("reading a .gguf file needs the `gguf` package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"cannot read '{gguf_path}' as a causal LM: {err}") from None

    # save_pretrained refuses a model carrying the GGUF quantization_config; a model built from the
    # same config without it holds the same (already dequantized) tensors and saves normally
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(out_dir)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)  # writes the chat template with it
    (out_dir / SOURCE_RECORD).write_text(json.dumps(_source_stamp(gguf_path)))
    for written in out_dir.iterdir():
        written.chmod(0o644)  # the weights file comes out private (0600); a model dir is shared like any other
