"""Built-in data sets the project generates, so the default run needs nothing from outside.

`reverse`: "reverse 48213 =" -> " 31284". A tiny model learns it within a few hundred steps on
two CPU cores, and the response match on the held-out split shows it: near 0 before, high after.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from toolkit.errors import UserError
from toolkit.recipe import BUILTIN_PREFIX

TASKS = ("reverse",)
SIZES = {"train": 20000, "eval": 256}
DIGITS = (3, 7)  # digit-string lengths, inclusive


def _reverse_example(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(*DIGITS)))
    return f"reverse {digits} =", f" {digits[::-1]}"


def generate(task: str, split: str, folder: Path, seed: int = 0) -> Path:
    """Write ``folder/TASK-SPLIT.jsonl`` (instruction records) and return its path.

    Every prompt is drawn once across both splits, so there are no duplicates inside a split
    and no overlap between them (the audit would flag either); the same seed always gives
    byte-identical files. Files are written whole, then renamed, so a reader never sees half.
    """
    if task not in TASKS:
        raise UserError(f"no built-in data set named {task!r}", f"built-in data sets: {', '.join(TASKS)}")
    rng = random.Random(f"{task}-{seed}")
    splits: dict[str, list[tuple[str, str]]] = {}
    seen: set[str] = set()
    for name in ("eval", "train"):
        rows = splits[name] = []
        while len(rows) < SIZES[name]:
            prompt, response = _reverse_example(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append((prompt, response))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}-{split}.jsonl"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for prompt, response in splits[split]:
            out.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    tmp.replace(path)
    return path


def materialize(location: str, split: str) -> str:
    """``builtin:NAME`` generated into the cache (its file's path); any other location as given.

    The one place a recipe's data location is resolved, for the training gate and `dstk audit`.
    """
    if not location.startswith(BUILTIN_PREFIX):
        return location
    return str(generate(location[len(BUILTIN_PREFIX):], split, cache_dir(), seed=0))


def cache_dir() -> Path:
    """Where generated sets live before a run copies them: ``$DSTK_CACHE`` or ~/.cache/dstk."""
    return Path(os.environ.get("DSTK_CACHE", Path.home() / ".cache" / "dstk")) / "data"
