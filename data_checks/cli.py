"""``dstk audit``: parse, call :func:`data_checks.audit`, print the summary, map the verdict to an exit code.

Exit codes: 0 pass, 1 findings at or above the failing severity, 2 unusable input (one line on
stderr). ``python -m data_checks.cli`` runs the same command without the rest of ``dstk``.
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
_DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``audit`` subcommand to ``dstk``'s subparsers."""
    parser = subparsers.add_parser("audit", help="audit data before training: provenance, leakage, PII",
                                   description=DESCRIPTION, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``dstk audit`` with parsed arguments; return the exit code."""
    try:
        return _run(args)
    except AuditInputError as err:
        print(f"dstk audit: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m data_checks.cli ARGS``: the same as ``dstk audit ARGS``."""
    parser = argparse.ArgumentParser(prog="dstk audit", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return args.run(args)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="a recipe (YAML path or built-in name): audit its "
                        "data.train and data.eval under its audit policy")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as for dstk train")
    parser.add_argument("--train", metavar="F", help="training data file or folder (instead of a recipe)")
    parser.add_argument("--eval", metavar="F", help="eval data file or folder")
    parser.add_argument("--benchmark", metavar="F", action="append", default=[],
                        help="a benchmark the training data must not contain (repeatable)")
    parser.add_argument("--manifest", metavar="M", help="provenance manifest (YAML) of the data files")
    parser.add_argument("--report", metavar="DIR", help="where to write report.json and report.md "
                        f"(default: OUTPUT_DIR/audit with a recipe, else ./{DEFAULT_REPORT_DIR})")
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
                        help="report records longer than N whitespace tokens (default: the recipe's train.seq_len)")
    parser.add_argument("--fail-on", choices=("info", "warning", "error"),
                        help="lowest severity that fails (default: the policy's fail_on, error)")
    parser.set_defaults(run=run)


def _run(args: argparse.Namespace) -> int:
    from data_checks.runner import audit  # the heavy imports wait until a command really runs
    from data_checks.manifest import draft_manifest
    from data_checks.policy import AuditPolicy
    from data_checks.sources import data_files

    if args.recipe and args.train:
        raise AuditInputError("give a recipe or --train, not both: a recipe's data.train is what it audits")
    if args.recipe:
        train, eval_, policy, max_tokens, report_dir = _from_recipe(args)
    elif args.train:
        train, eval_ = _spec(args, args.train, None), _spec(args, args.eval, None) if args.eval else None
        policy, max_tokens, report_dir = AuditPolicy(), None, Path(DEFAULT_REPORT_DIR)
    else:
        raise AuditInputError("nothing to audit: pass a recipe, or --train FILE (with --eval, --benchmark, "
                              "--manifest as needed)")
    if args.init_manifest:
        files = [f for spec in (train, eval_) if spec is not None for f in data_files(spec.path, "data")]
        out = Path(args.manifest or Path(train.path).parent / "manifest.yaml")
        draft_manifest(files, out)
        print(f"wrote {out}: fill in version, license, use, creators, sources and model_generated, then run "
              f"dstk audit --manifest {out} ...")
        return 0
    updates = {"benchmarks": policy.benchmarks + [_spec(args, b, None) for b in args.benchmark]}
    if args.fail_on:
        updates["fail_on"] = args.fail_on
    policy = policy.model_copy(update=updates)
    report = audit(train, eval_, policy=policy, manifest=args.manifest, report_dir=args.report or report_dir,
                   max_tokens=args.max_tokens or max_tokens)
    print(report.summary_table())
    return report.exit_code


def _spec(args: argparse.Namespace, path: str, split: str | None, **defaults):
    """A DataSpec from a path and the field flags (flags win over ``defaults``)."""
    from data_checks.policy import DataSpec

    fields = {name: getattr(args, name) or defaults.get(name) for name in
              ("format", "text_field", "prompt_field", "response_field", "messages_field")}
    return DataSpec(path=path, split=split, **{k: v for k, v in fields.items() if v is not None})


def _from_recipe(args: argparse.Namespace):
    """(train, eval, policy, max_tokens, report_dir) from a recipe and its overrides."""
    if args.recipe.lower().endswith(_DATA_SUFFIXES):
        raise AuditInputError(f"{args.recipe} looks like a data file, not a recipe: pass it as --train "
                              f"{args.recipe}")
    from toolkit.data.builtin import materialize  # toolkit is imported only for recipes
    from toolkit.errors import UserError
    from toolkit.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except UserError as err:
        raise AuditInputError(str(err)) from None
    data = recipe.data
    fields = {name: getattr(data, name, None) for name in
              ("format", "text_field", "prompt_field", "response_field", "messages_field")}
    train = _spec(args, materialize(data.train, "train"), None, **fields)
    eval_path = args.eval or (materialize(data.eval, "eval") if data.eval else None)
    eval_ = _spec(args, eval_path, None, **fields) if eval_path else None
    return train, eval_, recipe.audit, recipe.train.seq_len, Path(recipe.output_dir) / "audit"


if __name__ == "__main__":
    sys.exit(main())
