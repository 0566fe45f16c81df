"""`dstk audit`: the data audit on its own, on data files or on a recipe's data.

On files it is ``data_checks``' own command line (which needs no torch); on a recipe it audits the
data exactly as the training gate would (``toolkit.plan.gate``), without writing into the run
directory: a run's ``audit/report.json`` is the one its run.json hashes.
"""

from __future__ import annotations

import argparse

from data_checks import cli as files_cli

DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet", ".txt")


def register(subparsers) -> None:
    parser = subparsers.add_parser("audit", help="audit data before training: provenance, leakage, PII",
                                   description=files_cli.DESCRIPTION, epilog=files_cli.EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="a recipe (YAML path or built-in name): audit its "
                        "data.train and data.eval under its audit policy, as the training gate does")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as for dstk train")
    files_cli.add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.recipe is None:
        return files_cli.run(args)
    from data_checks import AuditInputError
    from toolkit.errors import UserError

    if args.train:
        raise UserError("give a recipe or --train, not both", "a recipe's data.train is what it audits")
    if args.recipe.lower().endswith(DATA_SUFFIXES):
        raise UserError(f"{args.recipe} looks like a data file, not a recipe", f"pass it as --train {args.recipe}")
    try:
        return _audit_recipe(args)
    except AuditInputError as err:
        raise UserError(str(err)) from None


def _audit_recipe(args: argparse.Namespace) -> int:
    from toolkit.models.loading import resolve_model
    from toolkit.plan.gate import data_fields, token_counter
    from toolkit.plan.prepare import resolve_all_data
    from toolkit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    data = resolve_all_data(recipe)
    fields = data_fields(recipe)
    train = files_cli.spec(args, data["train"]["path"], **fields)
    eval_path = args.eval or data.get("eval", {}).get("path")
    eval_ = files_cli.spec(args, eval_path, **fields) if eval_path else None
    counter = token_counter(recipe, resolve_model(recipe.model, recipe.trust_remote_code))
    return files_cli.audit_and_report(args, train, eval_, recipe.audit, recipe.train.seq_len, counter)
