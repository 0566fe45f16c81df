"""Record quality: unreadable rows, invalid UTF-8, missing or empty fields, overlong records, and a
set made mostly of duplicates. One finding per problem kind and set, listing every record."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from data_checks.policy import QualityPolicy
from data_checks.report import Finding
from data_checks.scan import SplitScan

_LENGTHS_LISTED = 20  # token counts given as evidence of overlong records; the records are all listed


def row_findings(scan: SplitScan) -> list[Finding]:
    """Rows the reader could not parse, or parsed only after replacing invalid UTF-8."""
    source = scan.source
    grouped = defaultdict(list)
    for problem in source.problems:
        grouped[(problem.kind, problem.file)].append(problem)
    out = []
    for (kind, file), problems in grouped.items():
        what = "could not be parsed (skipped)" if kind == "unreadable_row" else "hold invalid UTF-8 (read with U+FFFD)"
        out.append(Finding(
            check=kind,
            severity="error",
            message=f"{len(problems)} rows of {file} {what}; first at line {problems[0].line}: {problems[0].detail}",
            records=[{"split": source.name, "index": p.row} for p in problems],
            evidence={"file": file, "lines": [p.line for p in problems], "first_error": problems[0].detail},
        ))
    return out


def record_findings(scan: SplitScan, policy: QualityPolicy, max_tokens: int | None) -> list[Finding]:
    """Missing and empty fields, overlong records, and too many exact copies in one set."""
    source = scan.source
    out = []
    grouped = defaultdict(list)
    for record, name, what in scan.blanks:
        grouped[(name, what)].append(record)
    for (name, what), records in sorted(grouped.items()):
        out.append(Finding(
            check=f"{what}_field",
            severity="error",
            message=f"{len(records)} records of {source.name} have {'no' if what == 'missing' else 'an empty'} "
                    f"{name!r}: fix or drop them",
            records=_located(scan, records),
            evidence={"field": name, "count": len(records)},
        ))
    if scan.overlong:
        records, tokens = zip(*scan.overlong)
        out.append(Finding(
            check="overlong_record",
            severity="warning",
            message=f"{len(records)} records of {source.name} exceed {max_tokens} tokens and will be "
                    f"truncated (longest: {max(tokens)})",
            records=_located(scan, records),
            evidence={"max_tokens": max_tokens, "longest": max(tokens), "median": int(np.median(tokens)),
                      "first_tokens": list(tokens[:_LENGTHS_LISTED])},
        ))
    usable = scan.digests[~scan.empty]
    if usable.shape[0]:
        redundant = 1 - np.unique(usable, axis=0).shape[0] / usable.shape[0]
        if redundant > policy.max_duplicate_fraction:
            out.append(Finding(
                check="mostly_duplicates",
                severity="error",
                message=f"{redundant:.0%} of {source.name}'s records are exact copies of another "
                        f"(limit {policy.max_duplicate_fraction:.0%}): deduplicate it",
                evidence={"redundant_fraction": round(float(redundant), 4), "records": int(usable.shape[0])},
            ))
    return out


def _located(scan: SplitScan, positions) -> list[dict]:
    source = scan.source
    return [{"split": source.name, "index": source.row_of(p)} for p in positions]
