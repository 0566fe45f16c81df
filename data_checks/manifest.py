"""Provenance manifests: the schema, drafting one from files, and checking data against one.

A manifest is a YAML file beside the data (one per data set) that says where the data came from and
what may be done with it, and pins every file by sha256 and record count. ``dstk audit
--init-manifest`` drafts one with the hashes and counts filled in and the rest left for a person.
A manifest that cannot be parsed, or has unknown keys or wrong types, is unusable input (exit 2);
one that is incomplete or does not match the data gives ``provenance`` findings (errors).
"""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from data_checks.errors import AuditInputError
from data_checks.files import sha256_file
from data_checks.policy import ProvenancePolicy, Use
from data_checks.report import Finding
from data_checks.sources import Source, count_rows


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceRef(_Strict):
    """Where (part of) the data was obtained."""

    uri: str = Field(description="URL or other locator of the upstream data.")
    revision: str | None = Field(default=None, description="Commit, tag or version retrieved.")
    retrieved: date | None = Field(default=None, description="Date retrieved (YYYY-MM-DD).")


class FileEntry(_Strict):
    """One data file, pinned."""

    path: str = Field(description="Path relative to the manifest's folder.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file's bytes.")
    records: int | None = Field(default=None, ge=0, description="Records in the file.")


class Manifest(_Strict):
    """A data set's provenance."""

    name: str | None = Field(default=None, description="The data set's name.")
    version: str | None = Field(default=None, description="Its version.")
    description: str | None = Field(default=None, description="What it is, in a sentence.")
    license: str | None = Field(default=None, description="SPDX license id or expression (MIT OR Apache-2.0).")
    use: Use | None = Field(default=None, description="What the license allows: commercial, non-commercial, research.")
    creators: list[str] = Field(default=[], description="People or organisations who made it.")
    sources: list[SourceRef] = Field(default=[], description="Where it came from.")
    derived_from: list[str] = Field(default=[], description="Upstream data sets it was made from.")
    model_generated: bool | None = Field(default=None, description="Whether a model wrote (part of) the records.")
    files: list[FileEntry] = Field(min_length=1, description="Every data file of the set.")

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value):
        # YAML reads `version: 1.0` as a float; a version is text.
        return str(value) if isinstance(value, (int, float)) else value


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest.

    Raises:
        AuditInputError: The file is missing, is not YAML, or does not fit the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise AuditInputError(f"manifest {path} does not exist: draft one with `dstk audit --init-manifest "
                              f"--manifest {path} --train FILE`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise AuditInputError(f"manifest {path}{where}: not valid YAML ({getattr(err, 'problem', err)}): fix "
                              "the YAML there") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                             for e in err.errors())
        raise AuditInputError(f"manifest {path}: {problems}: fix it (fields: {', '.join(Manifest.model_fields)})"
                              ) from None


def draft_manifest(files: list[Path], out: Path) -> str:
    """Write a manifest draft for data files: hashes and counts filled in, provenance left to fill.

    Args:
        files: The data files, all inside ``out``'s folder.
        out: Where to write the manifest; must not exist yet.

    Returns:
        The YAML text written.

    Raises:
        AuditInputError: ``out`` exists, or a file lies outside its folder.
    """
    if out.exists():
        raise AuditInputError(f"manifest {out} already exists: move it away, or pass another --manifest path")
    folder = out.resolve().parent
    entries = []
    for file in files:
        resolved = file.resolve()
        if not resolved.is_relative_to(folder):
            raise AuditInputError(f"data file {file} is outside the manifest's folder {folder}: write the "
                                  "manifest into a folder that holds all data files (--manifest DIR/manifest.yaml)")
        entries.append({"path": resolved.relative_to(folder).as_posix(), "sha256": sha256_file(resolved),
                        "records": count_rows(resolved)})
    text = (
        "# Provenance manifest drafted by `dstk audit --init-manifest`. Fill in every null and empty\n"
        "# list, then run `dstk audit --manifest THIS_FILE ...`. File paths are relative to this folder.\n"
        f"name: {yaml.safe_dump(folder.name).splitlines()[0]}\n"
        "version: null          # e.g. \"1.0\", or the date of the snapshot\n"
        "description: null\n"
        "license: null          # SPDX id or expression: MIT, Apache-2.0, CC-BY-4.0, CC-BY-NC-4.0, ...\n"
        "use: null              # what the license allows: commercial | non-commercial | research\n"
        "creators: []           # people or organisations\n"
        "sources: []            # - {uri: https://..., revision: COMMIT_OR_VERSION, retrieved: YYYY-MM-DD}\n"
        "derived_from: []       # upstream data sets this one was made from\n"
        "model_generated: null  # true if a model wrote any of the records\n"
        + yaml.safe_dump({"files": entries}, sort_keys=False)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text


def check_manifest(manifest: Manifest, path: str | Path, sources: list[Source], hashes: dict[Path, str],
                   policy: ProvenancePolicy) -> list[Finding]:
    """Provenance findings for the audited sets against a manifest.

    Args:
        manifest: The manifest, from :func:`load_manifest`.
        path: Its file.
        sources: The train and eval sets (every file of theirs must be listed).
        hashes: sha256 of files already hashed, by resolved path.
        policy: Required fields and license policy.
    """
    where = str(path)
    out = []

    def problem(message: str, **evidence) -> None:
        out.append(Finding("provenance", "error", f"manifest {where}: {message}", [], {"manifest": where, **evidence}))

    missing = [f for f in policy.required_fields if getattr(manifest, f) in (None, "", [])]
    if missing:
        problem(f"required fields are empty: {', '.join(missing)}", missing_fields=missing)
    if manifest.license:
        reason = _license_problem(manifest.license, policy.license_allow, policy.license_deny)
        if reason:
            problem(f"license {manifest.license!r} {reason}", license=manifest.license,
                    allow=policy.license_allow, deny=policy.license_deny)
    if manifest.use and manifest.use not in policy.allowed_uses:
        problem(f"use {manifest.use!r} is not allowed by the policy (allowed: {', '.join(policy.allowed_uses)})",
                use=manifest.use, allowed_uses=policy.allowed_uses)
    folder = Path(path).resolve().parent
    rows = {f.resolve(): s.total_rows for s in sources if len(s.files) == 1 for f in s.files}
    listed = set()
    for entry in manifest.files:
        file = (folder / entry.path).resolve()
        if Path(entry.path).is_absolute() or not file.is_relative_to(folder):
            problem(f"file path {entry.path!r} escapes the manifest's folder", file=entry.path)
            continue
        listed.add(file)
        if not file.is_file():
            problem(f"listed file {entry.path} does not exist", file=entry.path)
            continue
        actual = hashes.get(file) or sha256_file(file)
        if actual != entry.sha256:
            problem(f"sha256 of {entry.path} does not match: the file changed since the manifest was written",
                    file=entry.path, expected=entry.sha256, actual=actual)
        if entry.records is not None:
            count = rows.get(file, None)
            count = count_rows(file) if count is None else count
            if count != entry.records:
                problem(f"{entry.path} has {count} records, the manifest says {entry.records}",
                        file=entry.path, expected=entry.records, actual=count)
    for source in sources:
        if not source.files:
            problem(f"{source.name} data {source.spec.path} is not a local file; its bytes cannot be pinned",
                    file=source.spec.path)
        for file in source.files:
            if file.resolve() not in listed:
                problem(f"{source.name} file {file} is not listed", file=str(file),
                        sha256=hashes.get(file.resolve()) or sha256_file(file))
    return out


def _license_problem(expression: str, allow: list[str], deny: list[str]) -> str | None:
    """Why an SPDX expression fails the allow/deny lists, or None when one alternative passes."""
    allowed, denied = {a.lower() for a in allow}, {d.lower() for d in deny}
    reasons = []
    for alternative in re.split(r"\s+OR\s+", expression.strip("() ")):
        ids = [term.strip("() ").split(" WITH ")[0].lower() for term in re.split(r"\s+AND\s+", alternative)]
        bad = [i for i in ids if i in denied or (allowed and i not in allowed)]
        if not bad:
            return None
        reasons.append(", ".join(bad))
    return f"is denied or not allowed by the policy ({'; '.join(reasons)})"
