"""The ``dstk`` command line: one module per subcommand in ``toolkit.commands``.

Each subcommand module has ``register(subparsers)`` and ``run(args) -> int``; the library does the
work. Bad input (:class:`toolkit.errors.UserError`) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from toolkit import quiet
from toolkit.errors import UserError

DESCRIPTION = ("Fine-tune Hugging Face causal LMs under DeepSpeed behind a data audit, and export verified "
               "quantized models.")
EPILOG = ("`dstk COMMAND --help` shows a command's options. Every recipe key, with its default, is in the README "
          "(`python -m toolkit.recipe --markdown` prints the table).")

# the modules of toolkit.commands; `checkpoints` registers `dstk rollback` too
COMMAND_MODULES = ("init", "train", "verify", "audit", "checkpoints", "export", "eval", "generate", "env")


class Parser(argparse.ArgumentParser):
    # argparse's own usage errors also exit 2, but as one line with the fix, like ours.
    def error(self, message: str):
        self.exit(2, f"dstk: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    try:
        return version("dstk")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dstk", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"dstk {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="let through DeepSpeed's and the other libraries' own logs (start-up, launcher)")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"toolkit.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[quiet.VERBOSE_ENV] = "1"  # the workers dstk starts inherit it
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"dstk {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C: every command leaves what it had finished, and no half-written output
        print(f"dstk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
