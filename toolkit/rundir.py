"""The run directory: where each of its files lives (PRODUCT.md's table), and run.json.

``toolkit.plan.prepare`` writes a run directory before any worker starts; every later stage
reads and extends it through :class:`RunDir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """Paths inside a run directory (PRODUCT.md's table)."""

    root: Path

    recipe = property(lambda self: self.root / "recipe.yaml")
    ds_config = property(lambda self: self.root / "ds_config.json")
    run_json = property(lambda self: self.root / "run.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    audit = property(lambda self: self.root / "audit")
    checkpoints = property(lambda self: self.root / "checkpoints")
    final = property(lambda self: self.root / "final")
    data = property(lambda self: self.root / "data")
    base_model = property(lambda self: self.root / "base_model")
    report = property(lambda self: self.root / "report.md")
    report_plot = property(lambda self: self.root / "report.png")

    def read_run(self) -> dict:
        return json.loads(self.run_json.read_text(encoding="utf-8"))

    def write_run(self, run: dict) -> None:
        tmp = self.run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.run_json)  # a reader never sees half a run.json
