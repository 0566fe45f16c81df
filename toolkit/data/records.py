"""Reading a data set's records through `datasets`: local files, folders of them, hub ids.

The file formats are the data audit's (``data_checks.files``), so whatever the audit read, training
reads the same way.
"""

from __future__ import annotations

from pathlib import Path

from data_checks.files import BUILDERS, builder, builder_options
from toolkit.errors import UserError


def load_records(source: str, *, trust_remote_code: bool = False):
    """Load ``source`` as a single ``datasets.Dataset`` (the train split of a hub data set).

    The data audit has already read and checked local files before any worker starts; errors
    here mean a file changed or a hub id is unreachable.
    """
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    try:
        if path.is_file():
            reader = builder(path)
            if reader is None:
                raise UserError(f"data file {path} has an unknown extension {path.suffix!r}",
                                f"use one of {', '.join(BUILDERS)}")
            return datasets.load_dataset(reader, data_files=str(path), split="train", keep_in_memory=True,
                                         **builder_options(path))
        if path.is_dir():
            return datasets.load_dataset(str(path), split="train", keep_in_memory=True)
        if builder(path) or source.startswith((".", "/")):
            raise UserError(f"data file {path} does not exist", "check the path in data.train / data.eval")
        return datasets.load_dataset(source, split="train", trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types for unreadable input
        raise UserError(f"could not read data {source}: {str(err).splitlines()[0]}",
                        "run `dstk audit` on it to find the bad record") from None
