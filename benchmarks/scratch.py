"""A benchmark's working folder. Its runs hold gigabytes of checkpoints (they once filled this
project's disk mid-benchmark), so it is deleted at the end unless the user asks to keep it."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def add_keep_flag(parser: argparse.ArgumentParser, size: str) -> None:
    parser.add_argument("--keep", action="store_true", help=f"keep the runs ({size}) instead of deleting them")


@contextmanager
def scratch(prefix: str, keep: bool) -> Iterator[Path]:
    """A new folder under the system's temporary one, deleted on leaving (said where, if ``keep``)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
