"""Findings, the verdict, and the report files: ``report.json`` for tools, ``report.md`` for people.

``report.json`` has PRODUCT.md's shape, ``{"verdict", "findings": [{check, severity, records,
evidence, ...}]}``, plus the inputs and counts. It holds no timestamps or absolute paths of its own,
so the same data and policy give the same bytes, and :attr:`AuditReport.sha256` (the hash of those
bytes) can go into a run's lineage.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_checks.policy import SEVERITY_RANK, Severity

# Checks in the order a reader wants them: provenance first, then leakage, then the rest.
CHECK_ORDER = (
    "provenance", "exact_duplicate", "near_duplicate", "ngram_contamination", "pii",
    "unreadable_row", "invalid_utf8", "missing_field", "empty_field", "mostly_duplicates",
    "overlong_record", "poisoning",
)
_MD_FINDINGS_PER_CHECK = 20  # report.md lists this many per check; report.json lists all
_MD_RECORDS_PER_FINDING = 8
_MD_PAIRS_SHOWN = 3  # near-duplicate pairs shown side by side per finding
_EXCERPT_CHARS = 200


def excerpt(text: str) -> str:
    """A text shortened for evidence: whitespace collapsed, at most 200 characters."""
    text = " ".join(text.split())
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS - 3] + "..."


@dataclass
class Finding:
    """One problem, and every record it involves.

    Attributes:
        check: The check's name, e.g. ``exact_duplicate``.
        severity: ``info``, ``warning`` or ``error``.
        message: One line for people.
        records: ``{"split": NAME, "index": N}`` for each record involved, N the 0-based row in the
            set's file.
        evidence: Scores, matched text, checksums: whatever shows the finding is real.
    """

    check: str
    severity: Severity
    message: str
    records: list[dict[str, Any]] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "severity": self.severity,
            "message": self.message,
            "records": self.records,
            "evidence": self.evidence,
        }

    def _sort_key(self) -> tuple:
        order = CHECK_ORDER.index(self.check) if self.check in CHECK_ORDER else len(CHECK_ORDER)
        first = self.records[0] if self.records else {}
        return (-SEVERITY_RANK[self.severity], order, str(first.get("split", "")),
                int(first.get("index", -1)), self.message)


@dataclass
class AuditReport:
    """The audit's result.

    Attributes:
        findings: Every finding, most severe first.
        fail_on: The lowest severity that fails.
        inputs: One entry per audited set: split, role, path, records, files with sha256.
        redacted: Split name to the path of its redacted copy, for PII checks set to ``redact``.
        report_dir: Where report.json and report.md were written, if anywhere.
    """

    findings: list[Finding]
    fail_on: Severity = "error"
    inputs: list[dict[str, Any]] = field(default_factory=list)
    redacted: dict[str, str] = field(default_factory=dict)
    report_dir: Path | None = None
    # split -> {record index: line in its file}, for the records report.md names (JSON-lines sets)
    lines: dict[str, dict[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.findings = sorted(self.findings, key=Finding._sort_key)

    @property
    def verdict(self) -> str:
        """``fail`` when a finding is at or above ``fail_on``, else ``pass``."""
        floor = SEVERITY_RANK[self.fail_on]
        return "fail" if any(SEVERITY_RANK[f.severity] >= floor for f in self.findings) else "pass"

    @property
    def exit_code(self) -> int:
        """0 for pass, 1 for fail (2, unusable input, is raised as AuditInputError instead)."""
        return 0 if self.verdict == "pass" else 1

    def counts(self) -> dict[str, dict[str, int]]:
        """Per check, how many findings of each severity."""
        table: dict[str, Counter] = {}
        for finding in self.findings:
            table.setdefault(finding.check, Counter())[finding.severity] += 1
        return {check: dict(counter) for check, counter in table.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "fail_on": self.fail_on,
            "inputs": self.inputs,
            "counts": self.counts(),
            "redacted": self.redacted,
            "findings": [f.to_dict() for f in self.findings],
        }

    def to_json(self) -> str:
        """The exact content of report.json: the summary first, then one finding per line."""
        content = self.to_dict()
        findings = [json.dumps(f, ensure_ascii=False) for f in content.pop("findings")]
        head = json.dumps(content, ensure_ascii=False)[:-1]
        body = "[\n" + ",\n".join(findings) + "\n]" if findings else "[]"
        return f'{head}, "findings": {body}}}\n'

    @property
    def sha256(self) -> str:
        """sha256 of report.json's bytes: ``sha256sum report.json`` prints the same."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def write(self, directory: str | Path) -> Path:
        """Write report.json and report.md into ``directory``; return report.json's path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "report.json").write_text(self.to_json(), encoding="utf-8")
        (directory / "report.md").write_text(self.to_markdown(), encoding="utf-8")
        self.report_dir = directory
        return directory / "report.json"

    def summary_table(self) -> str:
        """The console summary: verdict, then one row per check with its findings and records."""
        totals = Counter(f.severity for f in self.findings)
        lines = [
            f"audit {self.verdict.upper()}: {totals['error']} errors, {totals['warning']} warnings, "
            f"{totals['info']} info (fails on: {self.fail_on})"
        ]
        rows = _check_rows(self.findings)
        if rows:
            lines.append(f"  {'check':<22}{'severity':<10}{'findings':>9}{'records':>10}")
            lines += [f"  {c:<22}{s:<10}{n:>9}{r:>10}" for c, s, n, r in rows]
        if self.report_dir is not None:
            lines.append(f"  report: {self.report_dir / 'report.json'}")
        lines += [f"  redacted copy of {split}: {path}" for split, path in self.redacted.items()]
        return "\n".join(lines)

    def shown_records(self) -> dict[str, set[int]]:
        """Per split, the record indices report.md names (the first few of the first findings per check)."""
        shown: dict[str, set[int]] = {}
        for finding in _listed(self.findings):
            for record in finding.records[:_MD_RECORDS_PER_FINDING]:
                shown.setdefault(record["split"], set()).add(int(record["index"]))
            for pair in finding.evidence.get("pairs", [])[:_MD_PAIRS_SHOWN] if finding.check == "near_duplicate" else []:
                for side in (pair["a"], pair["b"]):
                    shown.setdefault(side["split"], set()).add(int(side["index"]))
        return shown

    def _name(self, record: dict) -> str:
        line = self.lines.get(record["split"], {}).get(int(record["index"]))
        return f"{record['split']}[{record['index']}]" + (f" (line {line})" if line else "")

    def to_markdown(self) -> str:
        """report.md: inputs, a table per check, then the findings (the first few per check)."""
        out = [f"# Data audit: {self.verdict.upper()}", "",
               f"Fails on findings of severity `{self.fail_on}` or above.", "", "## Inputs", "",
               "| split | role | path | records |", "|---|---|---|---|"]
        out += [f"| {i['split']} | {i['role']} | `{i['path']}` | {i['records']} |" for i in self.inputs]
        out += ["", "## Findings", ""]
        rows = _check_rows(self.findings)
        if not rows:
            out.append("None.")
        else:
            out += ["| check | severity | findings | records |", "|---|---|---|---|"]
            out += [f"| {c} | {s} | {n} | {r} |" for c, s, n, r in rows]
        for finding in _listed(self.findings):
            records = ", ".join(self._name(r) for r in finding.records[:_MD_RECORDS_PER_FINDING])
            more = len(finding.records) - _MD_RECORDS_PER_FINDING
            records += f" and {more} more (report.json lists every one)" if more > 0 else ""
            out += ["", f"### {finding.check} ({finding.severity})", "", finding.message]
            if records:
                out += ["", f"Records: {records}"]
            pairs = finding.evidence.get("pairs", []) if finding.check == "near_duplicate" else []
            if pairs and "a_text" in pairs[0]:
                out += self._side_by_side(pairs[:_MD_PAIRS_SHOWN], finding.evidence.get("pairs_total", len(pairs)))
            evidence = {k: v for k, v in finding.evidence.items() if k != "pairs"} if pairs else finding.evidence
            if "item_marked" in evidence:  # contamination: the item beside the record, shared words in bold
                out += ["", "| item | record | coverage |", "|---|---|---|",
                        f"| {_cell(evidence['item_marked'])} | {_cell(evidence['reference_marked'])} | "
                        f"{evidence['coverage']:.0%} |"]
                evidence = {k: v for k, v in evidence.items() if not k.endswith("_marked")}
            out += ["", "```json", json.dumps(evidence, ensure_ascii=False), "```"]
        counts = Counter(f.check for f in self.findings)
        for check, n in counts.items():
            if n > _MD_FINDINGS_PER_CHECK:
                out += ["", f"{n - _MD_FINDINGS_PER_CHECK} more `{check}` findings are in report.json."]
        return "\n".join(out) + "\n"

    def _side_by_side(self, pairs: list[dict], total: int) -> list[str]:
        """Near-duplicate pairs as a table: each record's text beside the other's."""
        rows = ["", "| record | text | record | text | Jaccard |", "|---|---|---|---|---|"]
        for pair in pairs:
            cells = [self._name(pair["a"]), _cell(pair["a_text"]), self._name(pair["b"]), _cell(pair["b_text"]),
                     f"{pair['jaccard']:.2f}"]
            rows.append("| " + " | ".join(cells) + " |")
        if total > len(pairs):
            rows += ["", f"{total - len(pairs)} more pairs are in report.json."]
        return rows


def _cell(text: str) -> str:
    """A text as one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _listed(findings: list[Finding]) -> list[Finding]:
    """The findings report.md shows: the first ones of each check."""
    shown: Counter = Counter()
    listed = []
    for finding in findings:
        shown[finding.check] += 1
        if shown[finding.check] <= _MD_FINDINGS_PER_CHECK:
            listed.append(finding)
    return listed


def _check_rows(findings: list[Finding]) -> list[tuple[str, str, int, int]]:
    """(check, severity, findings, distinct records) rows, in report order."""
    groups: dict[tuple[str, str], list[Finding]] = {}
    for finding in findings:
        groups.setdefault((finding.check, finding.severity), []).append(finding)
    rows = []
    for (check, severity), group in groups.items():
        records = {(r["split"], r["index"]) for f in group for r in f.records}
        rows.append((check, severity, len(group), len(records)))
    return rows
