"""The audit gate: run ``data_checks.audit`` on a recipe's data before any worker starts.

A failing audit stops the run (exit 1) with the report's path; unusable data stops it with a
one-line error (exit 2). ``audit.enforce=false`` skips the gate, and run.json says so.
"""

from __future__ import annotations

from pathlib import Path

from data_checks import AuditInputError, DataSpec, audit

from toolkit.errors import AuditFailed, UserError
from toolkit.recipe import Recipe


# findings that mean a data file could not be read as written
UNREADABLE = ("unreadable_row", "invalid_utf8")


def _spec(recipe: Recipe, path: str, split: str) -> DataSpec:
    d = recipe.data
    return DataSpec(path=path, split=split, format=d.format, text_field=d.text_field,
                    prompt_field=d.prompt_field, response_field=d.response_field,
                    messages_field=d.messages_field)


def run_gate(recipe: Recipe, train: str, evaluation: str | None, report_dir: Path,
             published_dir: Path, count_tokens=None) -> dict:
    """Audit the resolved train/eval data of ``recipe``; return the lineage entry for run.json.

    Args:
        recipe: the validated recipe (its ``audit`` block is the policy).
        train, evaluation: resolved data locations (files, folders or hub ids).
        report_dir: where ``report.json`` and ``report.md`` are written.
        published_dir: where the caller moves them, the path run.json and messages name.
        count_tokens: ``texts -> token lengths`` with the model's tokenizer, for the length check.

    Raises:
        UserError: the data cannot be read, has rows that cannot be (malformed JSON, invalid
            UTF-8), or lacks the fields its format needs (exit 2).
        AuditFailed: findings at the failing severity (exit 1).
    """
    if not recipe.audit.enforce:
        return {"verdict": "skipped", "enforced": False}
    import datasets

    datasets.disable_progress_bars()  # per-file loading bars; the audit shows its own progress
    try:
        report = audit(train=_spec(recipe, train, "train"),
                       eval=_spec(recipe, evaluation, "eval") if evaluation else None,
                       policy=recipe.audit, manifest=recipe.audit.manifest, report_dir=report_dir,
                       max_tokens=recipe.train.seq_len, count_tokens=count_tokens)
    except AuditInputError as err:
        raise UserError(str(err)) from None
    unreadable = [f for f in report.findings if f.check in UNREADABLE]
    if unreadable:  # the audit lists every bad row; training needs a file it can read whole
        raise UserError(f"{unreadable[0].records[0]['split']} data: {unreadable[0].message}",
                        "fix or drop that line; `dstk audit` lists every bad row")
    entry = {"verdict": report.verdict, "enforced": True, "report_sha256": report.sha256,
             "report": str(published_dir / "report.json"), "findings": len(report.findings)}
    if report.verdict != "pass":
        raise AuditFailed(f"the data audit failed with {len(report.findings)} finding(s); "
                          f"see {published_dir / 'report.md'}",
                          "fix the data, or set audit.enforce=false to train anyway (recorded in run.json)")
    return entry
