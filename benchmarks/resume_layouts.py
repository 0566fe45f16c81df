"""Resume on another layout, every pair: does a run continued under layout B from a checkpoint of
layout A repeat A's uninterrupted run?

For each source layout (ranks x ZeRO stage x offload x pipeline stages) a run of 8 steps is trained with a checkpoint
at step 4; for each other layout a copy of it is rolled back to step 4 and continued there
(``resume=auto``, ``parallel.elastic=true`` so the global batch is kept when the ranks change).
A pair passes when steps 5-8 log the source run's losses and the final weights are its weights
(relative 1e-5). Prints a markdown table (rows: source, columns: target) and writes JSON with --json.

    python benchmarks/resume_layouts.py                         # all 11 x 10 pairs (about 60 minutes on 2 cores)
    python benchmarks/resume_layouts.py --sources 2:2:none:1    # one source layout against every target
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from toolkit.checkpoints import store as checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["train.max_steps=8", "train.log_steps=1", "train.save_steps=4", "data.eval=null", "audit.enforce=false",
          "data.train_limit=2000", "parallel.elastic=true"]
LAYOUTS = [*(f"{nproc}:{zero}:{offload}:1" for nproc in (2, 1) for zero in (1, 2, 3)
             for offload in ("none", "cpu") if offload == "none" or zero >= 2),
           "2:1:none:2"]  # a 2-stage pipeline
TOLERANCE = 1e-5


def overrides(layout: str) -> list[str]:
    nproc, zero, offload, stages = layout.split(":")
    data_parallel = int(nproc) // int(stages)
    return [f"parallel.nproc={nproc}", f"parallel.zero_stage={zero}", f"parallel.offload={offload}",
            f"parallel.pipeline_stages={stages}",
            f"train.grad_accum={2 // data_parallel}"]  # a global batch of 32 records on every layout


def dstk(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def difference(resumed: Path, original: Path) -> float:
    """The largest relative difference of steps 5-8's losses and the final weights."""
    mine, theirs = losses(resumed), losses(original)
    worst = max(abs(mine[s] - theirs[s]) / abs(theirs[s]) for s in range(5, 9))
    a, b = load_file(resumed / "final" / "model.safetensors"), load_file(original / "final" / "model.safetensors")
    for key in b:
        worst = max(worst, float(((a[key] - b[key]).abs().max() / b[key].abs().max().clamp_min(1e-12))))
    return worst


def one_pair(source: Path, target: str, scratch: Path) -> dict:
    out = scratch / "resumed"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    checkpoint.rollback(out / "checkpoints", 4)
    started = time.perf_counter()
    done = dstk("train", out / "recipe.yaml", f"output_dir={out}", "resume=auto", *overrides(target))
    seconds = time.perf_counter() - started
    if done.returncode == 2:
        return {"state": "refused", "reason": done.stderr.strip().splitlines()[-1]}
    if done.returncode != 0:
        return {"state": "FAIL", "reason": (done.stdout + done.stderr).strip().splitlines()[-1][:300]}
    diff = difference(out, source)
    return {"state": "pass" if diff <= TOLERANCE else "FAIL", "max_rel_diff": diff, "seconds": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="*", default=LAYOUTS, help="NPROC:ZERO:OFFLOAD:STAGES layouts to save with")
    parser.add_argument("--targets", nargs="*", default=LAYOUTS, help="layouts to resume under")
    parser.add_argument("--json", metavar="FILE", help="write the results here too")
    args = parser.parse_args()
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dstk-resume-layouts-") as scratch:
        for source in args.sources:
            original = Path(scratch) / f"original-{source.replace(':', '-')}"
            trained = dstk("train", f"output_dir={original}", *RECIPE, *overrides(source))
            if trained.returncode != 0:
                results[source] = {"*": {"state": "FAIL", "reason": "the source run failed: "
                                         + trained.stderr.strip().splitlines()[-1][:300]}}
                continue
            results[source] = {}
            for target in (t for t in args.targets if t != source):
                results[source][target] = one_pair(original, target, Path(scratch))
                print(f"{source} -> {target}: {results[source][target]}", file=sys.stderr, flush=True)
            shutil.rmtree(original)
    print_table(results, [t for t in args.targets])
    if args.json:
        Path(args.json).write_text(json.dumps({"tolerance": TOLERANCE, "torch": torch.__version__,
                                               "results": results}, indent=2) + "\n")
    return 1 if any(r["state"] == "FAIL" for row in results.values() for r in row.values()) else 0


def print_table(results: dict, targets: list[str]) -> None:
    print("| saved with (ranks:ZeRO:offload:stages) \\ resumed with | " + " | ".join(targets) + " |")
    print("|---" * (len(targets) + 1) + "|")
    for source, row in results.items():
        cells = []
        for target in targets:
            cell = row.get(target) or row.get("*")
            cells.append("-" if cell is None else cell["state"] if cell["state"] != "pass"
                         else f"pass ({cell['max_rel_diff']:.0e})")
        print(f"| {source} | " + " | ".join(cells) + " |")
    counted = [r["state"] for row in results.values() for r in row.values()]
    print(f"\n{len(counted)} pairs: {counted.count('pass')} pass, {counted.count('refused')} refused, "
          f"{counted.count('FAIL')} FAIL (tolerance {TOLERANCE:.0e} relative, losses of steps 5-8 and final weights)")


if __name__ == "__main__":
    sys.exit(main())
