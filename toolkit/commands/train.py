"""`dstk train [RECIPE] [key=value ...]`: validate, gate, launch the workers, report."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a model from a recipe (default: the built-in `tiny`)",
        description="Validate the recipe, run the data audit gate, launch DeepSpeed workers, train, "
        "checkpoint and consolidate the result to a Hugging Face model in OUTPUT_DIR/final.")
    parser.add_argument("recipe", nargs="?", default=None,
                        help="a recipe YAML path or built-in name (default: tiny)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="dotted key=value overrides, e.g. parallel.zero_stage=3 train.max_steps=20")
    parser.set_defaults(run=run)


def run(args) -> int:
    from toolkit.launcher import launch
    from toolkit.recipe import load_recipe
    from toolkit.report import print_run_summary

    recipe_arg, overrides = args.recipe, list(args.overrides)
    if recipe_arg is not None and "=" in recipe_arg:  # `dstk train key=value` with no recipe
        recipe_arg, overrides = None, [recipe_arg, *overrides]
    recipe = load_recipe(recipe_arg, overrides)
    code = launch(recipe)
    print_run_summary(recipe, code)
    return code
