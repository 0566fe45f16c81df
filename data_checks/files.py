"""The files of a data set: which files a path names, what format each is read as, their sha256.

Light on purpose (no ``datasets``, no numpy): ``toolkit`` uses it to read and hash the same files
the audit reads, with the same formats.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from data_checks.errors import AuditInputError

BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
            ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst"}


def builder(path: Path) -> str | None:
    """The ``datasets`` builder that reads ``path`` (by its suffix, under any compression), or None."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def builder_options(path: Path) -> dict:
    """What the builder needs beyond the file: the separator of a TSV file."""
    return {"sep": "\t"} if Path(path).suffix.lower() == ".tsv" else {}


def data_files(path: str, role: str) -> list[Path]:
    """The data files of a local path: the file itself, or the data files in a folder.

    Raises:
        AuditInputError: The path does not exist, or the folder holds no data file.
    """
    local = Path(path).expanduser()
    if local.is_file():
        return [local]
    if not local.is_dir():
        raise AuditInputError(f"{role} data {path} does not exist: pass an existing file (JSONL, JSON, CSV, "
                              "TSV, Parquet, TXT), a folder of them, or a hub id")
    files = sorted(p for p in local.iterdir() if p.is_file() and builder(p))
    if not files:
        raise AuditInputError(f"{role} data folder {path} holds no data file: put JSONL, JSON, CSV, TSV, "
                              "Parquet or TXT files in it, or pass one file")
    return files


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_json_document(path: Path) -> bool:
    """True for a JSON file holding one document (an array), not one object per line."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"[")


def json_lines(path: Path) -> bool:
    """Whether ``path`` holds one JSON record per line, uncompressed: record N is its N-th non-blank line."""
    return builder(path) == "json" and Path(path).suffix.lower() not in COMPRESSIONS and not is_json_document(path)


def line_numbers(path: Path, rows: set[int]) -> dict[int, int]:
    """The 1-based line of each 0-based record row of a JSON-lines file (blank lines hold no record)."""
    found, row = {}, 0
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if row in rows:
                found[row] = line_no
                if len(found) == len(rows):
                    break
            row += 1
    return found
