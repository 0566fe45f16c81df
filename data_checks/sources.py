"""Load the sets to audit with ``datasets``, and turn their rows into the texts the checks compare.

Each record has three views: ``full`` (everything the model trains on, parts joined by newlines),
``prompt`` (what an eval or benchmark item asks: the prompt, the user turns, or the text) and
``response`` (the response or assistant turns; none for plain text).

A JSON-lines file that ``datasets`` cannot parse is read again line by line, so that a few bad rows
become findings with their file and line instead of stopping the audit. Record indices are always
the 0-based row number in the file (blank lines do not count, as in ``datasets``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from data_checks.errors import AuditInputError, MissingField
from data_checks.files import (
    COMPRESSIONS,
    builder,
    builder_options,
    data_files,
    is_json_document,
)
from data_checks.policy import DataSpec, Format, Role

# The DataSpec attributes naming the fields each format reads.
_FORMAT_FIELDS = {"text": ("text_field",), "instruction": ("prompt_field", "response_field"),
                  "chat": ("messages_field",)}


@dataclass
class RowProblem:
    """A row that could not be read as it is: ``kind`` is ``unreadable_row`` or ``invalid_utf8``."""

    kind: str
    file: str
    line: int  # 1-based line in the file
    row: int  # 0-based row number in the set, counting every non-blank line
    detail: str


@dataclass
class Batch:
    """Consecutive records of one set, in the three views (see the module docstring)."""

    positions: np.ndarray  # positions in the loaded data set
    full: list[str]
    prompt: list[str]
    response: list[str] | None
    blanks: list[tuple[int, str, str]]  # (offset in batch, field, "missing" | "empty")


@dataclass
class Source:
    """A loaded set: its role, its rows, and how to read them."""

    name: str
    role: Role
    spec: DataSpec
    format: Format
    dataset: datasets.Dataset
    files: list[Path]
    rows: np.ndarray | None = None  # file row of each loaded row, when some rows were unreadable
    problems: list[RowProblem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def total_rows(self) -> int:
        """Rows in the files, readable or not."""
        return len(self) + sum(p.kind == "unreadable_row" for p in self.problems)

    def row_of(self, position: int) -> int:
        """The 0-based file row of a loaded row."""
        return int(self.rows[position]) if self.rows is not None else int(position)

    def fields(self) -> list[str]:
        """The fields this set's format reads."""
        return [getattr(self.spec, attr) for attr in _FORMAT_FIELDS[self.format]]

    def texts(self, positions: np.ndarray, view: str = "full") -> list[str]:
        """The ``full``, ``prompt`` or ``response`` texts of the loaded rows at ``positions``."""
        if len(positions) == 0:
            return []
        return [t for batch in self.batches(len(positions), np.asarray(positions))
                for t in (getattr(batch, view) or [])]

    def batches(self, size: int, positions: np.ndarray | None = None) -> Iterator[Batch]:
        """Yield the records (all, or those at ``positions``) in batches of ``size``."""
        table = self.dataset.select_columns(self.fields())
        if positions is None:
            for start in range(0, len(table), size):
                yield self._views(np.arange(start, min(start + size, len(table))),
                                  table[start:start + size])
        else:
            for start in range(0, len(positions), size):
                chunk = positions[start:start + size]
                yield self._views(chunk, table[chunk.tolist()])

    def _views(self, positions: np.ndarray, columns: dict) -> Batch:
        blanks: list[tuple[int, str, str]] = []

        def texts(name: str) -> list[str]:
            values = ["" if v is None else v if isinstance(v, str) else str(v) for v in columns[name]]
            blanks.extend((i, name, "missing" if columns[name][i] is None else "empty")
                          for i, v in enumerate(values) if not v or v.isspace())
            return values

        if self.format == "text":
            full = texts(self.spec.text_field)
            return Batch(positions, full, full, None, blanks)
        if self.format == "instruction":
            prompt, response = texts(self.spec.prompt_field), texts(self.spec.response_field)
            full = [f"{p}\n{r}" for p, r in zip(prompt, response)]
            return Batch(positions, full, prompt, response, blanks)
        prompt, response, full = [], [], []
        for i, messages in enumerate(columns[self.spec.messages_field]):
            if not isinstance(messages, list) or not messages:
                blanks.append((i, self.spec.messages_field, "missing" if messages is None else "empty"))
                messages = []
            turns = [(m.get("role"), str(m.get("content") or "")) for m in messages if isinstance(m, dict)]
            prompt.append("\n".join(c for r, c in turns if r != "assistant"))
            response.append("\n".join(c for r, c in turns if r == "assistant"))
            full.append("\n".join(c for _, c in turns))
        return Batch(positions, full, prompt, response, blanks)


def load_source(spec: DataSpec, role: Role, name: str) -> Source:
    """Load one set and check that its fields are there.

    Args:
        spec: Where the set is and which fields hold its text.
        role: ``train``, ``eval`` or ``benchmark``.
        name: Its split name in the report.

    Returns:
        The loaded set.

    Raises:
        AuditInputError: The path does not exist, a file cannot be parsed at all, the set is empty,
            or the fields its format needs are absent.
    """
    if not Path(spec.path).expanduser().exists() and _looks_like_hub_id(spec.path):
        return _checked(Source(name, role, spec, "text", _load_hub(spec, role), []))
    files = data_files(spec.path, role)
    builders = {builder(p) for p in files}
    if len(builders) != 1 or None in builders:
        raise AuditInputError(f"{role} data {spec.path}: cannot read {files[0].name!r} and the files "
                              "beside it as one set: use one format (JSONL, JSON, CSV, TSV, Parquet, TXT)")
    reader = builders.pop()
    if reader in _LINE_BUILDERS:
        _check_record_sizes(files, role)
    dataset, rows, problems = _load_files(files, reader, role)
    return _checked(Source(name, role, spec, "text", dataset, files, rows, problems))


# One record per line in these formats, so a line is a record; a record this large is a broken
# export or an attack, not training data (it would stall every check that reads it).
_LINE_BUILDERS = {"csv", "text", "json"}
MAX_RECORD_BYTES = 16 * 2**20


def _check_record_sizes(files: list[Path], role: str) -> None:
    for path in files:
        if path.suffix.lower() in COMPRESSIONS or path.stat().st_size <= MAX_RECORD_BYTES or is_json_document(path):
            continue
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if len(raw) > MAX_RECORD_BYTES:
                    raise AuditInputError(
                        f"{role} data {path} line {line_no} is a record of {len(raw) / 2**20:.1f} MiB; records over "
                        f"{MAX_RECORD_BYTES // 2**20} MiB are refused: split it into several records or drop it")


def count_rows(path: Path) -> int:
    """Records in one data file, readable or not (non-blank lines for JSON lines)."""
    if builder(path) == "json" and not is_json_document(path):
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    return len(_load_files([path], builder(path), "manifest")[0])


def _looks_like_hub_id(path: str) -> bool:
    head = path.split(":", 1)[0]
    return head.count("/") == 1 and not head.startswith((".", "/", "~")) and builder(Path(head)) is None


def _load_hub(spec: DataSpec, role: Role) -> datasets.Dataset:
    repo, _, split = spec.path.partition(":")
    try:
        return datasets.load_dataset(repo, split=split or "train")
    except Exception as err:  # offline, unknown id, unknown split: all unusable input here
        raise AuditInputError(f"{role} data {spec.path} is not a local file or folder, and loading it "
                              f"from the hub failed ({type(err).__name__}: {_one_line(err)}): pass a "
                              "local path, or check the id and your network") from None


def _invalid_utf8_at(path: Path) -> int | None:
    """Byte offset of the first invalid UTF-8 in a plain-text file, or None if it is all valid."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                return offset + err.start
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        return offset + err.start
    return None


def _load_files(files: list[Path], reader: str, role: str):
    kwargs = builder_options(files[0])
    # pyarrow reads invalid UTF-8 into string columns without a word and fails later, on use
    broken = {path: at for path in files if reader != "parquet" and path.suffix.lower() not in COMPRESSIONS
              and (at := _invalid_utf8_at(path)) is not None}
    if broken and reader == "json":
        return _read_json_lines(files, role)  # each bad line becomes a finding with its line number
    if broken:
        path, at = next(iter(broken.items()))
        raise AuditInputError(f"{role} data {path}: invalid UTF-8 at byte {at}: save the file as UTF-8")
    try:
        dataset = datasets.load_dataset(reader, data_files=[str(p) for p in files], split="train", **kwargs)
        return dataset, None, []
    except Exception as err:  # datasets wraps parser errors in several types
        if reader != "json":
            raise AuditInputError(f"{role} data {files[0]}: cannot be read as {reader.upper()} "
                                  f"({_one_line(err)}): fix the file or convert it to JSONL") from None
    return _read_json_lines(files, role)


def _read_json_lines(files: list[Path], role: str):
    """Parse JSON files line by line, keeping the good rows and noting the bad ones."""
    records, rows, problems = [], [], []
    row = 0
    for path in files:
        if is_json_document(path):
            for value in _read_json_document(path, role):
                records.append(value)
                rows.append(row)
                row += 1
            continue
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    problems.append(RowProblem("invalid_utf8", str(path), line_no, row,
                                               f"invalid UTF-8 at byte {err.start} of the line"))
                    line = raw.decode("utf-8", errors="replace")
                try:
                    value = json.loads(line)
                    if not isinstance(value, dict):
                        raise ValueError(f"a JSON {type(value).__name__}, not an object")
                except ValueError as err:
                    problems.append(RowProblem("unreadable_row", str(path), line_no, row, _one_line(err)))
                else:
                    records.append(value)
                    rows.append(row)
                row += 1
    if not records:
        first = problems[0] if problems else None
        where = f"{first.file} line {first.line}: {first.detail}" if first else f"{files[0]}: no rows"
        raise AuditInputError(f"{role} data has no readable JSON row ({where}): write one JSON object "
                              "per line (JSONL), or a JSON array of objects")
    try:
        dataset = datasets.Dataset.from_list(records)
    except Exception as err:  # pyarrow cannot unify the rows' types
        raise AuditInputError(f"{role} data {files[0]}: rows disagree on field types ({_one_line(err)}): "
                              "give each field one type in every row") from None
    return dataset, np.asarray(rows, dtype=np.int64), problems


def _read_json_document(path: Path, role: str) -> list[dict]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise AuditInputError(f"{role} data {path}: invalid UTF-8 at byte {err.start}: save the file as "
                              "UTF-8") from None
    except json.JSONDecodeError as err:
        raise AuditInputError(f"{role} data {path} line {err.lineno} column {err.colno}: {err.msg}: fix "
                              "the JSON there") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise AuditInputError(f"{role} data {path}: expected a JSON array of objects: write one object "
                              "per record")
    return value


def _checked(source: Source) -> Source:
    """Resolve the set's format and check that its fields are present."""
    columns = source.dataset.column_names
    spec = source.spec
    where = f"{source.role} data {spec.path}"
    if len(source.dataset) == 0:
        raise AuditInputError(f"{where} has no records: pass a file with at least one record")
    format_ = spec.format or _detect_format(spec, columns)
    if format_ is None:
        raise AuditInputError(
            f"{where}: cannot tell its format from its fields ({', '.join(columns)}): pass --format and "
            "the field names (--text-field, or --prompt-field and --response-field, or --messages-field)")
    source.format = format_
    for attr in _FORMAT_FIELDS[format_]:
        if getattr(spec, attr) not in columns:
            raise MissingField(where, attr, getattr(spec, attr), columns)
    return source


def _detect_format(spec: DataSpec, columns: list[str]) -> Format | None:
    chosen = spec.model_fields_set  # a field the user named says which format they mean
    for format_, attrs in _FORMAT_FIELDS.items():
        if chosen & set(attrs):
            return format_
    if spec.messages_field in columns:
        return "chat"
    if spec.prompt_field in columns and spec.response_field in columns:
        return "instruction"
    if spec.text_field in columns:
        return "text"
    return None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] + ("..." if len(text) > 200 else "")
