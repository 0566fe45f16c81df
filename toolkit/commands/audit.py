"""`dstk audit`: the data audit on its own (the command lives with the checks, in data_checks)."""

from data_checks.cli import register, run

__all__ = ["register", "run"]
