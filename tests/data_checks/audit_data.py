"""Generated data for the audit tests: templated arithmetic, random paragraphs, and helpers."""

from __future__ import annotations

import json
import random
from pathlib import Path

_TEMPLATES = (
    ("What is {a} plus {b}?", lambda a, b: a + b),
    ("Add {a} and {b}.", lambda a, b: a + b),
    ("Compute {a} - {b}.", lambda a, b: a - b),
    ("What is {a} times {b}?", lambda a, b: a * b),
    ("Tom has {a} apples and buys {b} more. How many apples does Tom have now?", lambda a, b: a + b),
    ("A shop sells {a} pens a day. How many pens does it sell in {b} days?", lambda a, b: a * b),
)
_WORDS = [f"{c}{v}{e}" for c in "bcdfghklmnprstvz" for v in "aeiou" for e in ("n", "r", "s", "t", "ck")]


def arithmetic(count: int, seed: int, exclude: set | None = None) -> list[dict]:
    """Distinct templated arithmetic records ({prompt, response}), none of them in ``exclude``."""
    rng, seen, rows = random.Random(seed), set(exclude or ()), []
    while len(rows) < count:
        template = rng.randrange(len(_TEMPLATES))
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        if (template, a, b) in seen:
            continue
        seen.add((template, a, b))
        text, answer = _TEMPLATES[template]
        rows.append({"prompt": text.format(a=a, b=b), "response": f"The answer is {answer(a, b)}.",
                     "_key": (template, a, b)})
    return rows


def paragraph(rng: random.Random, words: int) -> list[str]:
    """Random pronounceable words: every 5-word shingle is unique, so Jaccard is exact by design."""
    return [rng.choice(_WORDS) + str(rng.randint(0, 99)) for _ in range(words)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def records_of(report, check: str, severity: str | None = None) -> list[set]:
    """For each finding of a check, the set of (split, index) it names."""
    return [{(r["split"], r["index"]) for r in f.records} for f in report.findings
            if f.check == check and (severity is None or f.severity == severity)]
