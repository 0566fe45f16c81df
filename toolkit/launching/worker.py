"""The per-rank entry point the `deepspeed` launcher starts (``launch/train.py`` calls ``main``).

The launcher/worker contract: ``dstk train`` plans the run before any worker starts
(``toolkit.plan.prepare`` writes ``recipe.yaml``, ``ds_config.json`` and ``run.json``) and starts
every worker with ``--run-dir OUTPUT_DIR``; that directory is the worker's whole input, and the
worker plans nothing. Started by hand (``deepspeed launch/train.py --recipe R key=value ...``), a
worker gets the recipe instead and rank 0 plans the run first, as ``dstk train`` would have.
A worker exits 2 with one line on bad input, like ``dstk``.
"""

from __future__ import annotations

import argparse
import sys

from toolkit.errors import UserError
from toolkit.training.finetune import finetune, run_planned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one rank of a dstk run.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--run-dir", default=None, help="a run directory `dstk train` planned")
    source.add_argument("--recipe", default=None, help="recipe YAML path or built-in name (the run is planned here)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args, overrides = parser.parse_known_args(argv)

    try:
        if args.run_dir is not None:
            if overrides:
                raise UserError(f"--run-dir takes no overrides, got {' '.join(overrides)}",
                                "the planned recipe.yaml is the run's whole recipe")
            run_planned(args.run_dir)
        else:
            finetune(args.recipe, overrides)
    except UserError as err:
        print(f"dstk worker: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
