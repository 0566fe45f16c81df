"""`dstk verify [RECIPE] [key=value ...]`: does the recipe's parallel layout keep the maths of one rank?"""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify", help="check a recipe's parallel layout against a single-rank reference",
        description="Run a few steps under the recipe's parallel layout and under one plain rank on the same "
        "global batches, and compare per-step losses and gradient norms. Exit 0 within tolerance, 1 above it.")
    parser.add_argument("recipe", nargs="?", default=None, help="a recipe YAML path or built-in name (default: tiny)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.zero_stage=3")
    parser.add_argument("--steps", type=int, default=5, help="steps each side runs (default 5)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest relative difference that passes (default: 1e-4 in fp32, 2e-2 in bf16)")
    parser.add_argument("-o", "--out", default=None, help="keep both runs and verify.json here (default: discarded)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from toolkit.errors import UserError
    from toolkit.recipe import load_recipe
    from toolkit.training.parity import verify

    recipe_arg, overrides = args.recipe, list(args.overrides)
    if recipe_arg is not None and "=" in recipe_arg:
        recipe_arg, overrides = None, [recipe_arg, *overrides]
    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.out is not None and Path(args.out).exists():
        raise UserError(f"--out {args.out} already exists", "choose a new folder")
    recipe = load_recipe(recipe_arg, overrides)
    report = verify(recipe, args.steps, args.tolerance, Path(args.out) if args.out else None)

    def number(value, spec=".6g") -> str:
        return "-" if value is None else format(value, spec)

    print(f"\n{'step':>5}  {'loss':>12}  {'reference':>12}  {'rel diff':>9}  {'grad norm':>12}  {'reference':>12}  {'rel diff':>9}")
    for row in report.steps:
        print(f"{row['step']:>5}  {number(row['loss']):>12}  {number(row['reference_loss']):>12}  "
              f"{number(row['loss_diff'], '.1e'):>9}  {number(row['grad_norm']):>12}  "
              f"{number(row['reference_grad_norm']):>12}  {number(row['grad_norm_diff'], '.1e'):>9}")
    verdict = "PASS" if report.passed else "FAIL"
    print(f"dstk verify: {verdict}: largest relative difference {report.max_loss_diff:.1e} in loss, "
          f"{number(report.max_grad_norm_diff, '.1e')} in gradient norm (tolerance {report.tolerance:.0e})")
    return 0 if report.passed else 1
