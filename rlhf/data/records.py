"""Reading record files and checking every record against its format.

Formats (one JSON object per record; any record may carry "user_id", a string or an integer):
  sft       {"prompt": str, "completion": str}
            or {"messages": [{"role": str, "content": str}, ...]}: the last message is the assistant's
            answer, the ones before it are the prompt (the tokenizer's chat template renders them)
  rankings  {"prompt": str, "responses": [best, ..., worst]}  (K >= 2 distinct answers)
            or pairwise {"prompt": str, "chosen": str, "rejected": str}  (becomes K = 2)
  prompts   {"prompt": str}
  pretrain  {"text": str}

Where records come from, and how a row that cannot be parsed is reported: `rlhf.data.readers`.

Every normalised record has "source" ("file:line") and "user_id" (a string, or None when absent).
Blank lines are skipped silently. Unknown fields are ignored. A null value counts as missing, because a
columnar file fills a field that some rows lack with null.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

from rlhf.data.readers import InvalidRecord as _InvalidRecord
from rlhf.data.readers import read_rows as _read_rows
from rlhf.errors import DataError

logger = logging.getLogger(__name__)

KINDS = ("sft", "rankings", "prompts", "pretrain")

# How each kind looks, quoted in "missing field" errors so the message says how to fix the record.
_FORMATS = {
    "sft": '{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}',
    "rankings": '{"prompt": ..., "responses": [best, ..., worst]} or {"prompt": ..., "chosen": ..., "rejected": ...}',
    "prompts": '{"prompt": ...}',
    "pretrain": '{"text": ...}',
}
# ours: enough skipped records logged one by one to see the pattern, then only the counts
_MAX_SKIPS_LOGGED = 10


class RecordList(list):
    """The records of one `load_records` call, plus what was skipped on the way.

    `skipped` counts skipped records by reason ("missing field", "empty text", ...); it is empty unless
    `skip_invalid=True`, since otherwise the first invalid record raises.
    """

    def __init__(self, records=(), skipped: Counter | None = None):
        super().__init__(records)
        self.skipped: Counter[str] = Counter(skipped or {})

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skipped_summary(self) -> str:
        """E.g. "skipped 7 records: 4 missing field, 3 empty text" (or "skipped 0 records")."""
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.skipped.most_common())
        return f"skipped {self.num_skipped} records" + (f": {reasons}" if reasons else "")


def load_records(path: str | Path, kind: str, skip_invalid: bool = False) -> RecordList:
    """Read every record of `kind` from `path` (a file or a directory) and normalise it.

    Returns a `RecordList` (a list of dicts, see the module docstring for their fields) whose
    `.skipped` counts the records skipped when `skip_invalid` is True; those are also logged.
    Raises `DataError` naming file, line and field for the first invalid record (unless
    `skip_invalid`), for a missing or empty file, and when no record at all is valid.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory (resolved to {path.resolve()})")

    records: list[dict] = []
    skipped: Counter[str] = Counter()
    first_invalid: str | None = None
    for source, row in _read_rows(path):
        try:
            if isinstance(row, _InvalidRecord):
                raise row
            records.append(_normalise(row, kind, source))
        except _InvalidRecord as invalid:
            message = invalid.describe(source)
            if not skip_invalid:
                raise DataError(message) from None
            first_invalid = first_invalid or message
            skipped[invalid.reason] += 1
            log = logger.warning if sum(skipped.values()) <= _MAX_SKIPS_LOGGED else logger.debug
            log("skipping invalid %s record: %s", kind, message)

    result = RecordList(records, skipped)
    if not records and not skipped:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    if not records:
        raise DataError(
            f"{path}: all {result.num_skipped} {kind} records are invalid "
            f"({result.skipped_summary()}); the first: {first_invalid}"
        )
    if skipped:
        logger.warning("%s: %s of %d (%s data)", path, result.skipped_summary(),
                       len(records) + result.num_skipped, kind)
    return result


# ---------------------------------------------------------------------------------------------
# Checking and normalising one record.
# ---------------------------------------------------------------------------------------------

def _normalise(row: object, kind: str, source: str) -> dict:
    if not isinstance(row, dict):
        raise _InvalidRecord("not an object", f"expected a JSON object {_FORMATS[kind]}, got {_json_type(row)}")
    record = {"sft": _sft, "rankings": _ranking, "prompts": _prompt, "pretrain": _pretrain}[kind](row)
    record["user_id"] = _user_id(row)
    record["source"] = source
    return record


def _sft(row: dict) -> dict:
    has_messages = row.get("messages") is not None
    if has_messages and (row.get("prompt") is not None or row.get("completion") is not None):
        raise _InvalidRecord(
            "ambiguous format", 'has both "messages" and "prompt"/"completion"; keep one form', "messages"
        )
    if not has_messages:
        return {"prompt": _text(row, "prompt", "sft"), "completion": _text(row, "completion", "sft")}

    messages = row["messages"]
    if not isinstance(messages, list):
        raise _InvalidRecord("wrong type", f"expected a list of messages, got {_json_type(messages)}", "messages")
    if len(messages) < 2:
        raise _InvalidRecord(
            "too few messages",
            f"need the prompt message(s) and then the assistant's answer, got {len(messages)} message(s)",
            "messages",
        )
    normalised = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _InvalidRecord(
                "wrong type", f'expected {{"role": ..., "content": ...}}, got {_json_type(message)}', field
            )
        normalised.append(
            {"role": _text(message, "role", "sft", field), "content": _text(message, "content", "sft", field)}
        )
    if normalised[-1]["role"] != "assistant":
        raise _InvalidRecord(
            "no answer",
            f'the last message is the answer and must have role "assistant", got {normalised[-1]["role"]!r}',
            f"messages[{len(messages) - 1}].role",
        )
    return {"messages": normalised}


def _ranking(row: dict) -> dict:
    prompt = _text(row, "prompt", "rankings")
    has_responses = row.get("responses") is not None
    has_pair = row.get("chosen") is not None or row.get("rejected") is not None
    if has_responses and has_pair:
        raise _InvalidRecord(
            "ambiguous format", 'has both "responses" and "chosen"/"rejected"; keep one form', "responses"
        )
    if not has_responses and has_pair:
        chosen, rejected = _text(row, "chosen", "rankings"), _text(row, "rejected", "rankings")
        if chosen == rejected:
            raise _InvalidRecord(
                "duplicate responses", 'same text as "chosen"; a comparison needs two different answers', "rejected"
            )
        return {"prompt": prompt, "responses": [chosen, rejected]}

    responses = row.get("responses")
    if responses is None:
        raise _InvalidRecord(
            "missing field", f"missing; rankings records look like {_FORMATS['rankings']}", "responses"
        )
    if not isinstance(responses, list):
        raise _InvalidRecord(
            "wrong type", f"expected a list of answers [best, ..., worst], got {_json_type(responses)}", "responses"
        )
    if len(responses) < 2:
        raise _InvalidRecord("too few responses", f"need at least 2 answers, got {len(responses)}", "responses")
    first_index_of: dict[str, int] = {}
    for index, response in enumerate(responses):
        field = f"responses[{index}]"
        if not isinstance(response, str):
            raise _InvalidRecord("wrong type", f"expected a string, got {_json_type(response)}", field)
        if not response.strip():
            raise _InvalidRecord("empty text", "is empty; every ranked answer needs text", field)
        _check_encodable(response, field)
        if response in first_index_of:
            raise _InvalidRecord(
                "duplicate responses",
                f"responses[{first_index_of[response]}] and responses[{index}] are the same text; "
                "a ranking needs distinct answers",
                "responses",
            )
        first_index_of[response] = index
    return {"prompt": prompt, "responses": list(responses)}


def _prompt(row: dict) -> dict:
    return {"prompt": _text(row, "prompt", "prompts")}


def _pretrain(row: dict) -> dict:
    return {"text": _text(row, "text", "pretrain")}


def _text(row: dict, name: str, kind: str, parent: str | None = None) -> str:
    """The non-blank string `row[name]`; `parent` prefixes the field name in errors (messages[2].content)."""
    field = f"{parent}.{name}" if parent else name
    value = row.get(name)
    if value is None:
        raise _InvalidRecord("missing field", f"missing; {kind} records look like {_FORMATS[kind]}", field)
    if not isinstance(value, str):
        raise _InvalidRecord("wrong type", f"expected a string, got {_json_type(value)}", field)
    if not value.strip():
        raise _InvalidRecord("empty text", "is empty (or only whitespace)", field)
    _check_encodable(value, field)
    return value


def _check_encodable(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        # JSON's "\ud800" escape decodes to half a UTF-16 pair, which no tokenizer can encode
        raise _InvalidRecord(
            "not UTF-8",
            f"holds a lone surrogate {value[error.start]!r} at character {error.start}, which is not text; "
            "fix the escape (a \\ud8xx must be followed by a \\udcxx)",
            field,
        ) from None


def _user_id(row: dict) -> str | None:
    user_id = row.get("user_id")
    if isinstance(user_id, float):
        # pandas writes an integer column with gaps as floats, the gaps as NaN: take them back
        if math.isnan(user_id):
            return None
        if user_id.is_integer():
            user_id = int(user_id)
    if user_id is None:
        return None
    # bool is an int subclass, but `true` as a user id is surely a mistake
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
        raise _InvalidRecord("wrong type", f"expected a string or an integer, got {_json_type(user_id)}", "user_id")
    if isinstance(user_id, str) and not user_id.strip():
        raise _InvalidRecord("empty text", "is empty; leave user_id out when the user is unknown", "user_id")
    return str(user_id)


def _json_type(value: object) -> str:
    """The JSON name of a value's type, as the user wrote it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
