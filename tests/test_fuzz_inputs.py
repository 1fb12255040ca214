"""Fuzz-style inputs: malformed JSONL record files and YAML configs, from a seeded generator.

Every case ends in our own error (DataError / ConfigError, both RLHFError) or, with skip_invalid, in
a counted skip: each non-blank line is either a record or a counted skip. Never another exception,
and a stage that fails on its data leaves no partly written output (no adapter, checkpoint or DONE).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import rlhf.sft
from rlhf.config import load_config
from rlhf.data import load_records
from rlhf.errors import ConfigError, DataError
from rlhf.models import ModelConfig
from rlhf.sft import SFTConfig, SFTData
from rlhf.sft import train as train_sft

SEED = 1234
N_CASES = 60  # per kind: a few hundred files in all, well under a second each

VALID = {
    "sft": [{"prompt": "add 2 3", "completion": "5", "user_id": "u1"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    "rankings": [{"prompt": "add 2 3", "responses": ["5", "6", "7"], "user_id": 3},
                 {"prompt": "sort b a", "chosen": "a b", "rejected": "b a"}],
    "prompts": [{"prompt": "reverse a b c"}, {"prompt": "add 1 1", "user_id": "u2"}],
    "pretrain": [{"text": "the cat sat on the mat"}, {"text": "one two three"}],
}
ODD_TEXT = ["", " ", "\u200b", "\U0001F600" * 3, "\u202e reversed", "a\x00b", "\ud800", "é" * 5, "\t\n",
            "x" * 200_000]
ODD_VALUES = [None, 0, -1, 3.5, float("nan"), True, [], ["a"], {}, {"a": 1}, [None], "s"]


def mutate_record(rng: random.Random, record: dict) -> object:
    """One record, broken in one way: a wrong type, odd unicode, a missing field, or not an object."""
    record = json.loads(json.dumps(record))
    key = rng.choice(sorted(record))
    choice = rng.randrange(5)
    if choice == 0:
        record[key] = rng.choice(ODD_VALUES)
    elif choice == 1:
        record[key] = rng.choice(ODD_TEXT)
    elif choice == 2:
        del record[key]
    elif choice == 3:
        return rng.choice([[record], "text", 42, None, [1, 2]])
    else:
        record[rng.choice(ODD_TEXT[:9]) or "k"] = rng.choice(ODD_VALUES)  # extra field, odd name
    return record


def fuzz_bytes(rng: random.Random, kind: str) -> bytes:
    """A whole file: valid and broken records, then maybe a truncation, bad bytes, huge or deep lines."""
    lines = []
    for _ in range(rng.randint(0, 8)):
        record = rng.choice(VALID[kind])
        obj = mutate_record(rng, record) if rng.random() < 0.6 else record
        lines.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass"))
    extra = rng.randrange(8)
    if extra == 0:
        lines.append(b"[" * 100_000 + b"]" * 100_000)  # nested too deep for a recursive parser
    elif extra == 1:
        lines.append(b'{"prompt": "' + b"y" * 2_000_000 + b'"}')  # a huge line
    elif extra == 2:
        lines.insert(rng.randint(0, len(lines)), bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))))
    elif extra == 3:
        lines.append(b"   \t  ")
    data = (b"\r\n" if rng.random() < 0.2 else b"\n").join(lines)
    if data and rng.random() < 0.4:
        data = data[:rng.randrange(len(data))]  # cut off mid-write
    if rng.random() < 0.1:
        data = b"\xef\xbb\xbf" + data  # a byte-order mark
    return data


def non_blank_lines(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip(b" \t\r\n\x0b\x0c"))


@pytest.mark.parametrize("kind", sorted(VALID))
def test_fuzzed_jsonl_ends_in_data_error_or_counted_skips(tmp_path, kind):
    rng = random.Random(f"{SEED}-{kind}")
    for case in range(N_CASES):
        path = tmp_path / f"{kind}-{case}.jsonl"
        data = fuzz_bytes(rng, kind)
        path.write_bytes(data)
        for skip_invalid in (False, True):
            try:
                records = load_records(path, kind, skip_invalid=skip_invalid)
            except DataError:
                continue
            except Exception as err:  # the point of the test: report which input escaped, and how
                pytest.fail(f"{kind} case {case} (skip_invalid={skip_invalid}) raised {type(err).__name__}: "
                            f"{str(err)[:200]}; input starts {data[:120]!r}")
            assert records and all(r["source"].startswith(f"{path}:") for r in records)
            if skip_invalid:  # every line is accounted for: a record or a counted skip
                assert len(records) + records.num_skipped == non_blank_lines(data), (kind, case)
            else:
                assert records.num_skipped == 0


def test_empty_and_blank_files(tmp_path):
    for name, data in [("empty.jsonl", b""), ("blank.jsonl", b"\n \n\t\n"), ("bom.jsonl", b"\xef\xbb\xbf")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=r"no records \(the file is empty or holds only blank lines\)"):
            load_records(tmp_path / name, "sft")


def test_deeply_nested_json_array_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="deep.json: malformed JSON array"):
        load_records(path, "prompts")


def test_a_stage_that_fails_on_its_data_writes_no_outputs(tmp_path, monkeypatch):
    """SFT on broken files: a DataError, and no adapter, checkpoint or DONE (the model never loads)."""
    monkeypatch.setattr(rlhf.sft, "RoleModel", lambda *a, **k: pytest.fail("a model loaded on bad data"))
    (tmp_path / "model").mkdir()  # only its existence is checked: the data fail first
    rng = random.Random(SEED)
    broken = [b"", b'{"prompt": "a"}\n', b'{"prompt": "a", "completion": 3}\n', b"[" * 100_000,
              json.dumps(VALID["sft"][0]).encode()[:-5]]
    for case, data in enumerate(broken):
        path, out = tmp_path / f"bad-{case}.jsonl", tmp_path / f"run-{case}"
        path.write_bytes(data)
        cfg = SFTConfig(model=ModelConfig(path=str(tmp_path / "model"), quantization="none"),
                        data=SFTData(path=str(path), skip_invalid=rng.random() < 0.5), out_dir=str(out),
                        device="cpu")
        with pytest.raises(DataError, match=f"{path}"):
            train_sft(cfg)
        left = sorted(p.name for p in out.iterdir()) if out.exists() else []
        # the resolved config (written whole) and the run dir's claim (owner, lock): no adapter, checkpoint, DONE
        assert set(left) <= {"config.yaml", "OWNER", ".lock"}, left


# ------------------------------------------------------------------------------------------------
# YAML configs
# ------------------------------------------------------------------------------------------------
VALID_YAML = """\
out_dir: runs/sft
epochs: 2
batch_size: 8
micro_batch_size: 4
model:
  quantization: none
  lora_r: 8
  target_modules: [q_proj, v_proj]
optim:
  lr: 1.0e-3
  warmup_steps: 2
data:
  max_length: 64
  skip_invalid: true
"""
YAML_SNIPPETS = ["epochs: .nan", "epochs: .inf", "optim: {lr: .nan}", "1: 2", "? [a, b]\n: 1", "null: 3",
                 "out_dir: 2024-01-01", "epochs: 0x10", "model: [1, 2]", "data: ~", "seed: 1e400",
                 "&a x: *a", "epochs: !!python/object:os.system x", "batch_size: '8'", "device: {a: b}",
                 "model:\n\tlora_r: 3", "epochs: 2\nepochs: 3", "\u202eepochs: 1", "épochs: 3", "- a", "'",
                 "micro_batch_size: -4", "keep_last: 0", "resume: 12", "data: {skip_invalid: 1.5}",
                 "x" * 100_000 + ": 1", "model: {target_modules: [1, null]}", "precision: [bf16]"]


def fuzz_yaml(rng: random.Random) -> bytes:
    lines = VALID_YAML.splitlines()
    choice = rng.randrange(5)
    if choice == 0:
        lines.insert(rng.randint(0, len(lines)), rng.choice(YAML_SNIPPETS))
    elif choice == 1:
        lines = [rng.choice(YAML_SNIPPETS)]
    elif choice == 2:
        i = rng.randrange(len(lines))
        key = lines[i].split(":")[0]
        lines[i] = f"{key}: {json.dumps(rng.choice(ODD_VALUES[:-1] + ODD_TEXT[:6]), allow_nan=True)}"
    elif choice == 3:
        lines[rng.randrange(len(lines))] = rng.choice(["  ", "\t", "::", "- x", "{", "]", "epochs: [1, 2"])
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    if choice == 4 or rng.random() < 0.3:
        data = data[:rng.randrange(len(data) + 1)]
    if rng.random() < 0.1:
        data += bytes([rng.randrange(128, 256)])
    return data


def test_fuzzed_yaml_configs_end_in_config_error(tmp_path):
    rng = random.Random(SEED)
    assert load_config(SFTConfig, _write(tmp_path / "valid.yaml", VALID_YAML.encode())).epochs == 2
    for case in range(3 * N_CASES):
        data = fuzz_yaml(rng)
        path = _write(tmp_path / f"case-{case}.yaml", data)
        try:
            load_config(SFTConfig, path)
        except ConfigError:
            continue
        except Exception as err:
            pytest.fail(f"yaml case {case} raised {type(err).__name__}: {str(err)[:200]}; input {data[:200]!r}")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
