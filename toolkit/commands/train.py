"""`dstk train [RECIPE] [key=value ...]`: validate, gate, launch the workers, report."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model from a recipe (default: the built-in `tiny`)",
        description="Validate the recipe, run the data audit gate, launch DeepSpeed workers, train, "
        "checkpoint and consolidate the result to a Hugging Face model in OUTPUT_DIR/final.",
        epilog="Every recipe key can be overridden as key=value. The keys, their defaults and what each does are "
        "in the README's Recipes section (`python -m toolkit.recipe --markdown` prints that table); "
        "`dstk env` lists the built-in recipes and model presets.")
    parser.add_argument("recipe", nargs="?", default=None,
                        help="a recipe YAML path or built-in name (default: tiny)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="dotted key=value overrides, e.g. parallel.zero_stage=3 train.max_steps=20")
    _add_flags(parser)
    parser.set_defaults(run=run)


def _add_flags(parser) -> None:
    parser.add_argument("--node-rank", type=int, default=None, metavar="N",
                        help="this host's node number with one launcher per node (parallel.nodes > 1): "
                        "0 on the master, 1..nodes-1 on the others")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the DeepSpeed launcher command line and exit; nothing is audited or written")


def _late_flags(args) -> None:
    """Flags written after the recipe or an override land among the overrides; take them out."""
    from toolkit.cli import Parser

    flags = Parser(prog="dstk train", add_help=False)
    _add_flags(flags)
    late, args.overrides = flags.parse_known_args(args.overrides)
    args.node_rank = late.node_rank if late.node_rank is not None else args.node_rank
    args.dry_run = late.dry_run or args.dry_run


def run(args) -> int:
    from toolkit.launching.launcher import launch
    from toolkit.recipe import load_recipe
    from toolkit.training.report import print_run_summary

    _late_flags(args)
    recipe_arg, overrides = args.recipe, list(args.overrides)
    if recipe_arg is not None and "=" in recipe_arg:  # `dstk train key=value` with no recipe
        recipe_arg, overrides = None, [recipe_arg, *overrides]
    recipe = load_recipe(recipe_arg, overrides)
    code = launch(recipe, node_rank=args.node_rank, dry_run=args.dry_run)
    if not args.dry_run:
        print_run_summary(recipe, code, node_rank=args.node_rank)
    return code
