"""Reading a data set through `datasets`: local JSONL/JSON/CSV/Parquet files, folders, hub ids."""

from __future__ import annotations

from pathlib import Path

from toolkit.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"data file {path} has an unknown extension {path.suffix!r}",
                                f"use one of {', '.join(BUILDERS)}")
            return datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
        if path.is_dir():
            return datasets.load_dataset(str(path), split="train", keep_in_memory=True)
        if path.suffix.lower() in BUILDERS or source.startswith((".", "/")):
            raise UserError(f"data file {path} does not exist", "check the path in data.train / data.eval")
        return datasets.load_dataset(source, split="train", trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types for unreadable input
        raise UserError(f"could not read data {source}: {str(err).splitlines()[0]}",
                        "run `dstk audit` on it to find the bad record") from None
