"""``audit(...)``: load the sets, run the checks the policy asks for, and return the report.

Passes run held-out sets first (benchmarks, then eval), so that their item n-grams are known when
the reference sets (eval for benchmarks, train for both) stream past. Each set is read once for all
checks; the poisoning screen alone may read the training prompts twice more.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from data_checks import contamination, duplicates, pii, poisoning, quality
from data_checks.duplicates import MinHasher
from data_checks.errors import AuditInputError
from data_checks.files import json_lines, line_numbers, sha256_file
from data_checks.manifest import check_manifest, load_manifest
from data_checks.policy import AuditPolicy, DataSpec, Role
from data_checks.report import AuditReport, Finding
from data_checks.scan import CountTokens, ScanPlan, SplitScan, make_executor, scan_split
from data_checks.sources import Source, load_source

_PII_SEVERITY = {"warn": "warning", "fail": "error", "redact": "info"}
_PII_EXAMPLES = 5


def audit(
    train: DataSpec | str,
    eval: DataSpec | str | None = None,  # noqa: A002 - the public name, as in the recipe's data.eval
    benchmarks: Sequence[DataSpec | str] | None = None,
    policy: AuditPolicy | None = None,
    manifest: str | Path | None = None,
    report_dir: str | Path | None = None,
    max_tokens: int | None = None,
    count_tokens: CountTokens | None = None,
) -> AuditReport:
    """Audit training data, and its eval and benchmark sets, before training.

    Args:
        train: The training set (a path is read with its format detected from its fields).
        eval: The eval set, if any.
        benchmarks: Sets the training data must not contain; None: ``policy.benchmarks``.
        policy: Checks and thresholds; default: ``AuditPolicy()``.
        manifest: Provenance manifest of the train and eval files; None: ``policy.manifest``.
        report_dir: Where to write report.json, report.md and redacted copies; None: nowhere.
        max_tokens: Longest record, in tokens, before it is reported as overlong (usually
            ``train.seq_len``); ``policy.quality.max_tokens`` wins when set. None: no length check.
        count_tokens: Tokens per text for a batch of texts (e.g. a tokenizer's lengths); default:
            whitespace-separated words.

    Returns:
        The report; ``report.verdict`` is ``"pass"`` or ``"fail"``.

    Raises:
        AuditInputError: An input cannot be used (missing file, unparseable file, absent fields,
            bad manifest, duplicate set names, redaction without a report directory).
    """
    policy = policy or AuditPolicy()
    specs = _named_specs(train, eval, policy.benchmarks if benchmarks is None else benchmarks)
    redact_kinds = [k for k in pii.KINDS if policy.pii.enabled and getattr(policy.pii, k) == "redact"]
    if redact_kinds and report_dir is None:
        raise AuditInputError(f"the PII policy redacts {', '.join(redact_kinds)}, which writes a redacted copy: "
                              "pass a report directory (--report DIR) or choose warn or fail")
    manifest_path = manifest or policy.manifest
    loaded_manifest = load_manifest(manifest_path) if manifest_path else None  # fail before the long work
    sources = [load_source(spec, role, name) for spec, role, name in specs]
    hashes = {f.resolve(): sha256_file(f) for s in sources for f in s.files}
    own = [s for s in sources if s.role != "benchmark"]

    found: list[Finding] = []
    if loaded_manifest is not None:
        found += check_manifest(loaded_manifest, manifest_path, own, hashes, policy.provenance)
    else:
        found.append(Finding("provenance", "error" if policy.provenance.require_manifest else "info",
                             "no provenance manifest given: draft one with `dstk audit --init-manifest`"))
    scans = _scan_all(sources, policy, policy.quality.max_tokens or max_tokens, count_tokens)
    found += _checks(scans, policy)
    redacted = {}
    for scan in scans:
        positions = [record for record, kind, _ in scan.pii if kind in redact_kinds]
        if positions:
            path = Path(report_dir) / "redacted" / f"{scan.source.name}.jsonl"
            pii.write_redacted_copy(scan.source, positions, redact_kinds, path)
            redacted[scan.source.name] = str(path)
    found += _pii_findings(scans, policy, redacted)
    report = AuditReport(found, policy.fail_on, [_input(s, hashes) for s in sources], redacted)
    report.lines = _lines(sources, report.shown_records())
    if report_dir is not None:
        report.write(report_dir)
    return report


def _named_specs(train, eval_, benchmarks) -> list[tuple[DataSpec, Role, str]]:
    """(spec, role, split name) per set. A benchmark is named after its file unless named; a file name
    already taken gets its folder's name in front (``mmlu_test`` beside ``gsm8k_test``)."""
    def spec_of(value) -> DataSpec:
        return value if isinstance(value, DataSpec) else DataSpec(path=str(value))

    named = [(spec_of(train), "train", spec_of(train).split or "train")]
    if eval_ is not None:
        named.append((spec_of(eval_), "eval", spec_of(eval_).split or "eval"))
    specs = [spec_of(b) for b in benchmarks]
    stems = [Path(b.path).name.split(".")[0] for b in specs]
    taken = [name for _, _, name in named] + [b.split for b in specs if b.split]
    for spec, stem in zip(specs, stems):
        name = spec.split
        if name is None:
            clash = stem in taken or stems.count(stem) > 1
            name = f"{Path(spec.path).parent.name}_{stem}" if clash else stem
            taken.append(name)
        named.append((spec, "benchmark", name))
    names = [name for _, _, name in named]
    for name in names:
        if names.count(name) > 1:
            raise AuditInputError(f"two data sets are named {name!r} in the report: give each a distinct "
                                  "split name (DataSpec.split, or rename the benchmark file)")
    return named


def _scan_all(sources: list[Source], policy: AuditPolicy, max_tokens, count_tokens) -> list[SplitScan]:
    """Scan every set once, held-out sets first; return the scans in the sources' order."""
    dup, con = policy.duplicates, policy.contamination
    minhasher = MinHasher(dup.threshold, dup.num_perm) if dup.enabled and dup.near else None
    pii_kinds = tuple(k for k in pii.KINDS if policy.pii.enabled and getattr(policy.pii, k) != "off")
    ngram = con.ngram if con.enabled else None
    starts = _starts([len(s) for s in sources])
    scans: list[SplitScan | None] = [None] * len(sources)
    executor = make_executor(sum(len(s) for s in sources), policy.workers)
    try:
        for role in ("benchmark", "eval", "train"):
            targets = [s for s in scans if s is not None and s.source.role in contamination.TARGETS[role]]
            vocabulary = contamination.vocabulary(
                [contamination.item_grams(s, con.boilerplate_fraction) for s in targets]) if ngram else None
            for index, source in enumerate(sources):
                if source.role != role:
                    continue
                plan = ScanPlan(
                    minhasher=minhasher, shingle_words=dup.shingle_words,
                    held_ngram=ngram if role != "train" else None,
                    reference_ngram=ngram if targets else None, numbers_as_one=con.numbers_as_one,
                    pii_kinds=pii_kinds if role != "benchmark" else (),
                    responses=policy.poisoning.enabled and role == "train")
                scans[index] = scan_split(source, starts[index], plan, executor, vocabulary if targets else None,
                                          max_tokens if role != "benchmark" else None, count_tokens)
    finally:
        if executor is not None:
            executor.shutdown()
    return scans


def _checks(scans: list[SplitScan], policy: AuditPolicy) -> list[Finding]:
    """Findings of every check except provenance and PII."""
    found = []
    if policy.duplicates.enabled:
        found += duplicates.findings(scans, policy)
    con = policy.contamination
    for reference in scans:
        if not con.enabled or reference.reference_hits is None:
            continue
        for target in scans:
            if target.source.role in contamination.TARGETS[reference.source.role]:
                items = contamination.item_grams(target, con.boilerplate_fraction)
                found += contamination.findings(items, reference, con.ngram, policy)
    for scan in scans:
        found += quality.row_findings(scan)
        if policy.quality.enabled and scan.source.role != "benchmark":
            found += quality.record_findings(scan, policy.quality, scan.max_tokens)
        if policy.poisoning.enabled and scan.source.role == "train":
            found += poisoning.findings(scan, policy.poisoning)
    return found


def _pii_findings(scans: list[SplitScan], policy: AuditPolicy, redacted: dict[str, str]) -> list[Finding]:
    """One finding per PII kind and set, with its action's severity."""
    found = []
    for scan in scans:
        by_kind = defaultdict(list)
        for record, kind, masked in scan.pii:
            by_kind[kind].append((record, masked))
        source = scan.source
        for kind, matches in by_kind.items():
            action = getattr(policy.pii, kind)
            records = sorted({r for r, _ in matches})
            then = {"warn": "review them", "fail": "remove them, or redact them (pii.KIND: redact)",
                    "redact": f"redacted copy: {redacted.get(source.name)}"}[action]
            found.append(Finding(
                check="pii", severity=_PII_SEVERITY[action],
                message=f"{len(matches)} {kind.replace('_', ' ')} matches in {len(records)} records of "
                        f"{source.name}: {then}",
                records=[{"split": source.name, "index": source.row_of(r)} for r in records],
                evidence={"kind": kind, "action": action, "matches": len(matches),
                          "examples": [m for _, m in matches[:_PII_EXAMPLES]]}))
    return found


def _input(source: Source, hashes: dict[Path, str]) -> dict:
    return {"split": source.name, "role": source.role, "path": source.spec.path, "format": source.format,
            "records": len(source), "rows": source.total_rows,
            "files": [{"path": str(f), "sha256": hashes[f.resolve()]} for f in source.files]}


def _lines(sources: list[Source], shown: dict[str, set[int]]) -> dict[str, dict[int, int]]:
    """The file lines of the records report.md names, in sets read from one JSON-lines file."""
    return {source.name: line_numbers(source.files[0], shown[source.name]) for source in sources
            if source.name in shown and len(source.files) == 1 and json_lines(source.files[0])}


def _starts(sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts
