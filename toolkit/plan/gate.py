"""The audit gate: run ``data_checks.audit`` on a recipe's data before any worker starts.

A failing audit stops the run (exit 1) with the report's path; unusable data stops it with a
one-line error (exit 2). ``audit.enforce=false`` skips the gate, and run.json says so.

The mapping from a recipe to the audit's inputs lives here only (``dstk audit RECIPE`` uses it
too): the data's format and fields, the recipe's ``audit`` policy, and record lengths counted in
the model's own tokens against ``train.seq_len``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_checks import AuditInputError, DataSpec, audit
from data_checks.errors import MissingField
from data_checks.policy import SEVERITY_RANK
from toolkit.data.tokenizer import char_tokenizer
from toolkit.errors import AuditFailed, UserError
from toolkit.models.loading import ModelRef, load_tokenizer
from toolkit.recipe import Recipe

# findings that mean a data file could not be read as written
UNREADABLE = ("unreadable_row", "invalid_utf8")


def data_fields(recipe: Recipe) -> dict[str, str]:
    """The recipe's data format and field names, as ``DataSpec`` takes them."""
    return {name: getattr(recipe.data, name) for name in
            ("format", "text_field", "prompt_field", "response_field", "messages_field")}


def token_counter(recipe: Recipe, source: ModelRef):
    """Token lengths of a batch of texts with the model's tokenizer, for the overlong-record check."""
    tokenizer = char_tokenizer() if source.kind == "preset" else load_tokenizer(source.name, recipe.trust_remote_code)
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


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
        fields = data_fields(recipe)
        report = audit(train=DataSpec(path=train, split="train", **fields),
                       eval=DataSpec(path=evaluation, split="eval", **fields) if evaluation else None,
                       policy=recipe.audit, manifest=recipe.audit.manifest, report_dir=report_dir,
                       max_tokens=recipe.train.seq_len, count_tokens=count_tokens)
    except MissingField as err:  # in the recipe's terms: its data.* keys, not the audit command's flags
        raise UserError(f"{err.where}: field {err.field!r} not found; fields present: {', '.join(err.present)}",
                        f"set data.{err.attr} to the field that holds it, e.g. data.{err.attr}={err.present[0]}") from None
    except AuditInputError as err:
        raise UserError(str(err)) from None
    unreadable = [f for f in report.findings if f.check in UNREADABLE]
    if unreadable:  # the audit lists every bad row; training needs a file it can read whole
        raise UserError(f"{unreadable[0].records[0]['split']} data: {unreadable[0].message}",
                        "fix or drop that line; `dstk audit` lists every bad row")
    entry = {"verdict": report.verdict, "enforced": True, "report_sha256": report.sha256,
             "report": str(published_dir / "report.json"), "findings": len(report.findings)}
    floor = SEVERITY_RANK[recipe.audit.fail_on]
    failing = [f for f in report.findings if SEVERITY_RANK[f.severity] >= floor]
    if failing:
        others = len(report.findings) - len(failing)
        raise AuditFailed(f"the data audit failed with {len(failing)} finding(s) of severity "
                          f"{recipe.audit.fail_on} or above" + (f" (and {others} below it)" if others else "")
                          + f"; see {published_dir / 'report.md'}",
                          "fix the data, or set audit.enforce=false to train anyway (recorded in run.json)")
    _say_warnings(report, published_dir)
    return entry


def _say_warnings(report, published_dir: Path, most: int = 5) -> None:
    """A passing audit's warnings, one line each on stderr: they change what trains (truncated
    records, duplicates) and would otherwise stay in report.md."""
    warnings = [f for f in report.findings if f.severity == "warning"]
    for finding in warnings[:most]:
        print(f"dstk: audit warning: {finding.check}: {finding.message}", file=sys.stderr, flush=True)
    if warnings:
        more = f"{len(warnings) - most} more, " if len(warnings) > most else ""
        print(f"dstk: audit passed with {len(warnings)} warning(s) ({more}see {published_dir / 'report.md'})",
              file=sys.stderr, flush=True)
