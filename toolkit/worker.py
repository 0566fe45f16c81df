"""The per-rank entry point the `deepspeed` launcher starts (``launch/train.py`` calls ``main``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one rank of a dstk recipe.")
    parser.add_argument("--recipe", default=None, help="recipe YAML path or built-in name")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    args, overrides = parser.parse_known_args(argv)

    from toolkit.errors import UserError
    from toolkit.finetuning import finetune

    try:
        finetune(args.recipe, overrides)
    except UserError as err:
        print(f"dstk worker: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
