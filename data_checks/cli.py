"""The audit of data files from the command line: parse, call :func:`data_checks.audit`, print the
summary, map the verdict to an exit code.

Exit codes: 0 pass, 1 findings at or above the failing severity, 2 unusable input (one line on
stderr). ``python -m data_checks.cli --train F ...`` runs it without ``dstk``; ``dstk audit`` adds
the audit of a recipe's data (``toolkit.commands.audit``), which needs the recipe's model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_checks.errors import AuditInputError

DEFAULT_REPORT_DIR = "audit_report"
DESCRIPTION = """Audit data before training: provenance manifest, duplicates and leakage, benchmark
contamination, PII and secrets, record quality, planted triggers.
Exit 0: pass; 1: findings at or above the failing severity; 2: unusable input."""
EXAMPLES = """examples:
  dstk audit recipe.yaml
  dstk audit --train data/train.jsonl --eval data/test.jsonl --benchmark gsm8k/test.jsonl
  dstk audit --train train.jsonl --prompt-field question --response-field answer --report out/
  dstk audit --train data/train.jsonl --eval data/test.jsonl --init-manifest"""


def run(args: argparse.Namespace) -> int:
    """Run ``dstk audit`` with parsed arguments; return the exit code."""
    try:
        return _run(args)
    except AuditInputError as err:
        print(f"dstk audit: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m data_checks.cli ARGS``: the same as ``dstk audit ARGS`` on data files."""
    parser = argparse.ArgumentParser(prog="dstk audit", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.run(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of an audit of data files (``--train``, ``--eval``, fields, manifest, report)."""
    parser.add_argument("--train", metavar="F", help="training data file or folder (instead of a recipe)")
    parser.add_argument("--eval", metavar="F", help="eval data file or folder")
    parser.add_argument("--benchmark", metavar="F", action="append", default=[],
                        help="a benchmark the training data must not contain (repeatable)")
    parser.add_argument("--manifest", metavar="M", help="provenance manifest (YAML) of the data files")
    parser.add_argument("--report", metavar="DIR", help="where to write report.json and report.md "
                        f"(default: ./{DEFAULT_REPORT_DIR})")
    parser.add_argument("--init-manifest", action="store_true", help="draft a manifest for the data "
                        "files at --manifest (default: manifest.yaml beside the training data) and exit")
    parser.add_argument("--format", choices=("text", "instruction", "chat"),
                        help="data format of --train/--eval/--benchmark (default: detected from the fields)")
    parser.add_argument("--text-field", metavar="NAME",
                        help="text field of the text format (default: text)")
    parser.add_argument("--prompt-field", metavar="NAME",
                        help="prompt field of the instruction format (default: prompt)")
    parser.add_argument("--response-field", metavar="NAME",
                        help="response field of the instruction format (default: response)")
    parser.add_argument("--messages-field", metavar="NAME",
                        help="message list field of the chat format (default: messages)")
    parser.add_argument("--max-tokens", type=int, metavar="N",
                        help="report records longer than N tokens: words for data files, the model's tokens "
                        "for a recipe (default: the recipe's train.seq_len)")
    parser.add_argument("--fail-on", choices=("info", "warning", "error"),
                        help="lowest severity that fails (default: the policy's fail_on, error)")
    parser.set_defaults(run=run)


def _run(args: argparse.Namespace) -> int:
    from data_checks.policy import (
        AuditPolicy,  # the heavy imports wait until a command really runs
    )

    if not args.train:
        raise AuditInputError("nothing to audit: pass --train FILE (with --eval, --benchmark, --manifest as "
                              "needed), or a recipe to `dstk audit`")
    train, eval_ = spec(args, args.train), spec(args, args.eval) if args.eval else None
    return audit_and_report(args, train, eval_, AuditPolicy(), max_tokens=None, count_tokens=None)


def audit_and_report(args: argparse.Namespace, train, eval_, policy, max_tokens, count_tokens) -> int:
    """Audit ``train`` / ``eval_`` (``DataSpec``s) under ``policy`` and the flags; print the summary
    and return the exit code. ``--init-manifest`` drafts a manifest of their files instead."""
    from data_checks.auditor import audit
    from data_checks.files import data_files
    from data_checks.manifest import draft_manifest

    if args.init_manifest:
        files = [f for s in (train, eval_) if s is not None for f in data_files(s.path, "data")]
        out = Path(args.manifest or Path(train.path).parent / "manifest.yaml")
        draft_manifest(files, out)
        print(f"wrote {out}: fill in version, license, use, creators, sources and model_generated, then run "
              f"dstk audit --manifest {out} ...")
        return 0
    updates = {"benchmarks": policy.benchmarks + [spec(args, b) for b in args.benchmark]}
    if args.fail_on:
        updates["fail_on"] = args.fail_on
    policy = policy.model_copy(update=updates)
    report = audit(train, eval_, policy=policy, manifest=args.manifest, report_dir=args.report or DEFAULT_REPORT_DIR,
                   max_tokens=args.max_tokens or max_tokens, count_tokens=count_tokens)
    print(report.summary_table())
    return report.exit_code


def spec(args: argparse.Namespace, path: str, **defaults):
    """A DataSpec from a path and the field flags (flags win over ``defaults``)."""
    from data_checks.policy import DataSpec

    fields = {name: getattr(args, name) or defaults.get(name) for name in
              ("format", "text_field", "prompt_field", "response_field", "messages_field")}
    return DataSpec(path=path, **{k: v for k, v in fields.items() if v is not None})


if __name__ == "__main__":
    sys.exit(main())
