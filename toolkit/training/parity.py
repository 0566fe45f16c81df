"""The parity guard behind `dstk verify`: a recipe's parallel layout against one plain rank.

The loss of a step is the token mean over the whole global batch (``toolkit.training.trainer``), so any
layout must give the per-step losses and gradient norms of a single rank running the same global
batch with plain data parallelism (ZeRO-0, no pipeline, no tensor slicing, no offload). A layout
that drifts from it has changed the maths: a broken tie, a gradient averaged twice, a shard lost.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.errors import UserError
from toolkit.launching.launcher import launch
from toolkit.recipe import Recipe, with_values
from toolkit.rundir import RunDir

# Relative differences that count as the same maths: fp32 reductions in another order differ in
# the last digits; bf16 rounds every matmul, differently per layout.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


@dataclass
class ParityReport:
    steps: list[dict] = field(default_factory=list)  # step, loss and grad_norm of each side, their differences
    max_loss_diff: float = 0.0
    max_grad_norm_diff: float | None = None  # None: a side did not report gradient norms
    tolerance: float = 0.0

    @property
    def passed(self) -> bool:
        worst = max(self.max_loss_diff, self.max_grad_norm_diff or 0.0)
        return bool(self.steps) and worst <= self.tolerance


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare(layout: list[dict], reference: list[dict], tolerance: float) -> ParityReport:
    """Compare two runs' ``metrics.jsonl`` step lines, step by step.

    Raises:
        UserError: the runs did not log the same steps.
    """
    mine = {line["step"]: line for line in layout if "loss" in line}
    theirs = {line["step"]: line for line in reference if "loss" in line}
    if sorted(mine) != sorted(theirs):
        raise UserError(f"the layout logged steps {sorted(mine)} and the reference {sorted(theirs)}",
                        "both runs must log every step")
    report = ParityReport(tolerance=tolerance)
    for step in sorted(mine):
        a, b = mine[step], theirs[step]
        row = {"step": step, "loss": a["loss"], "reference_loss": b["loss"], "loss_diff": _relative(a["loss"], b["loss"]),
               "grad_norm": a.get("grad_norm"), "reference_grad_norm": b.get("grad_norm"), "grad_norm_diff": None}
        report.max_loss_diff = max(report.max_loss_diff, row["loss_diff"])
        if a.get("grad_norm") is not None and b.get("grad_norm") is not None:
            row["grad_norm_diff"] = _relative(a["grad_norm"], b["grad_norm"])
            report.max_grad_norm_diff = max(report.max_grad_norm_diff or 0.0, row["grad_norm_diff"])
        report.steps.append(row)
    return report


def reference_of(recipe: Recipe) -> Recipe:
    """One rank, plain data parallelism, the same global batch (its micro-batches accumulated)."""
    p = recipe.parallel
    if p.nproc == 1 and p.zero_stage == 0 and p.offload == "none":
        raise UserError("the recipe's layout is already one plain rank: there is nothing to compare it with",
                        "pass the recipe whose parallel layout you want checked")
    return with_values(recipe, {
        "parallel.nproc": 1, "parallel.zero_stage": 0, "parallel.pipeline_stages": 1,
        "parallel.tensor_parallel": 1, "parallel.offload": "none", "parallel.ds_config": None,
        "parallel.master_port": None, "train.grad_accum": recipe.train.grad_accum * recipe.data_parallel,
    })


def short_run(recipe: Recipe, steps: int, output_dir: Path) -> Recipe:
    """``recipe`` cut to ``steps`` logged steps on this host, nothing saved between, no eval, no guard."""
    return with_values(recipe, {
        "parallel.nodes": 1, "parallel.hostfile": None, "parallel.node_local_storage": False,
        "output_dir": str(output_dir), "resume": None, "train.max_steps": steps, "train.log_steps": 1,
        "train.save_steps": 0, "train.eval_steps": 0, "train.keep_last": 0, "train.keep_best": 0,
        "train.divergence.action": "off", "data.eval": None, "lora.merge": False,
    })


def verify(recipe: Recipe, steps: int = 5, tolerance: float | None = None, workdir: Path | None = None) -> ParityReport:
    """Train ``steps`` steps under the recipe's layout and under :func:`reference_of`, and compare.

    Args:
        recipe: the recipe whose parallel layout is checked.
        steps: steps each side runs.
        tolerance: the largest relative difference that passes (default: by precision, TOLERANCE).
        workdir: where both runs go (default: a temporary folder, removed afterwards).

    Raises:
        UserError: bad recipe, or a side failed to train.
    """

    tolerance = TOLERANCE[recipe.train.precision] if tolerance is None else tolerance
    reference = reference_of(recipe)
    with tempfile.TemporaryDirectory(prefix="dstk-verify-") as scratch:
        root = Path(workdir or scratch)
        sides = {"layout": short_run(recipe, steps, root / "layout"), "reference": short_run(reference, steps, root / "reference")}
        lines = {}
        for name, side in sides.items():
            code = launch(side)
            if code != 0:
                raise UserError(f"the {name} run failed (exit {code}); its output is above", "fix the recipe and retry")
            metrics = RunDir(Path(side.output_dir)).metrics.read_text().splitlines()
            lines[name] = [json.loads(line) for line in metrics if line.strip()]
        report = compare(lines["layout"], lines["reference"], tolerance)
        if workdir is not None:
            (root / "verify.json").write_text(json.dumps({**vars(report), "passed": report.passed}, indent=2) + "\n")
        return report
