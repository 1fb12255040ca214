"""Reading the rows of a data file or directory, each with the place it came from.

Where records come from:
  *.jsonl, *.json   read here line by line, so an error names its line (1-based, as editors count);
                    a .json file that holds one JSON array is named by item ("file.json:row 3")
  *.parquet, *.arrow, *.csv
                    loaded with `datasets.load_dataset(<builder>, data_files=...)` (local, never the
                    hub); an error names the row, 0-based as `dataset[17]` counts ("file.parquet:row 17")
  a directory       written by `Dataset.save_to_disk` (read with `datasets.load_from_disk`), or holding
                    data files of the kinds above (read in name order, each named on its own)

`read_rows(path)` yields (source, row): the parsed object, or an `InvalidRecord` for a row that could
not be parsed (a bad byte, malformed JSON), so `load_records` can skip it like any other bad record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from rlhf.errors import DataError

_JSON_SUFFIXES = (".jsonl", ".json")
_DATASETS_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_DATA_SUFFIXES = _JSON_SUFFIXES + tuple(_DATASETS_BUILDERS)


class InvalidRecord(Exception):
    """One record breaks its format; `reason` is the short category that skips are counted under."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field

    def describe(self, source: str) -> str:
        where = f'{source}: field "{self.field}"' if self.field else source
        return f"{where}: {self.message}"


# ---------------------------------------------------------------------------------------------

def read_rows(path: Path) -> Iterator[tuple[str, object]]:
    if path.is_dir():
        yield from _read_directory(path)
    else:
        yield from _read_file(path)


def _read_directory(path: Path) -> Iterator[tuple[str, object]]:
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(
            f"{path}: a DatasetDict with splits {splits}; point at one split's folder, "
            f"e.g. {path / (splits[0] if splits else 'train')}"
        )
    if (path / "state.json").exists() and (path / "dataset_info.json").exists():
        import datasets  # heavy import, only when a saved dataset is read

        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as error:  # corrupt folders fail in many ways; say which folder
            raise DataError(f"{path}: cannot be read with datasets.load_from_disk: {error}") from error
        for row_index, row in enumerate(dataset):
            yield f"{path}:row {row_index}", row
        return

    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_DATA_SUFFIXES))
    if not files:
        raise DataError(
            f"{path}: no data files in this directory (looked for {', '.join(_DATA_SUFFIXES)}, "
            "or a folder written by Dataset.save_to_disk)"
        )
    for file in files:
        yield from _read_file(file)


def _read_file(path: Path) -> Iterator[tuple[str, object]]:
    suffix = path.suffix.lower()
    if suffix == ".json" and _starts_with_array(path):
        yield from _read_json_array(path)
    elif suffix in _JSON_SUFFIXES:
        yield from _read_json_lines(path)
    elif suffix in _DATASETS_BUILDERS:
        yield from _read_with_datasets(path, _DATASETS_BUILDERS[suffix])
    else:
        raise DataError(
            f"{path}: unknown data file type {suffix or '(no suffix)'!r}; "
            f"use one of {', '.join(_DATA_SUFFIXES)} or a folder written by Dataset.save_to_disk"
        )


def _read_json_lines(path: Path) -> Iterator[tuple[str, object]]:
    # Bytes, decoded per line, so a bad byte is reported on its line instead of stopping the read.
    with open(path, "rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            source = f"{path}:{line_number}"
            try:
                # utf-8-sig drops the byte-order mark some editors put at the start of a file
                line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield source, InvalidRecord(
                    "not UTF-8", f"not valid UTF-8 ({error.reason} at byte {error.start}); save the file as UTF-8"
                )
                continue
            if not line.strip():
                continue  # blank lines are allowed anywhere (a trailing newline, spacing between blocks)
            try:
                yield source, json.loads(line)
            except json.JSONDecodeError as error:
                yield source, InvalidRecord(
                    "malformed JSON",
                    f"malformed JSON: {error.msg} at column {error.colno}; each line must hold one JSON object",
                )
            except RecursionError:  # json's parser recurses once per level of [ or {
                yield source, InvalidRecord(
                    "malformed JSON", "malformed JSON: nested too deeply to parse; each line must hold one JSON object"
                )


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as file:
        head = file.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _read_json_array(path: Path) -> Iterator[tuple[str, object]]:
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        # one broken array loses every record, so this is never a skip
        raise DataError(f"{path}: malformed JSON array: {error}; or write one JSON object per line (.jsonl)") from error
    for row_index, row in enumerate(items):
        yield f"{path}:row {row_index}", row


def _read_with_datasets(path: Path, builder: str) -> Iterator[tuple[str, object]]:
    import datasets  # heavy import, only when a columnar file is read

    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # arrow/parquet readers raise many types; say which file and how it was read
        raise DataError(f"{path}: cannot be read as {builder}: {error}") from error
    for row_index, row in enumerate(dataset):
        yield f"{path}:row {row_index}", row
