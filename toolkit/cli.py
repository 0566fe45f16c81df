"""`dstk` command line: a dispatcher over one module per subcommand in ``toolkit.commands``.

Each subcommand module has ``register(subparsers)`` and ``run(args) -> int``; the library does the
work. Bad input (:class:`toolkit.errors.UserError`) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from toolkit.errors import UserError

# the modules of toolkit.commands; `checkpoints` registers `dstk rollback` too
COMMAND_MODULES = ("train", "verify", "audit", "checkpoints", "export", "eval", "generate", "env")


class Parser(argparse.ArgumentParser):
    # argparse's own usage errors also exit 2, but as one line with the fix, like ours.
    def error(self, message: str):
        self.exit(2, f"dstk: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dstk", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"toolkit.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"dstk {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
