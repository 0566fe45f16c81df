"""The end-of-run report on the console: what happened and where everything is."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from toolkit.recipe import Recipe
from toolkit.rundir import RunDir


def _metrics(run_dir: RunDir) -> list[dict]:
    if not run_dir.metrics.is_file():
        return []
    return [json.loads(line) for line in run_dir.metrics.read_text().splitlines() if line.strip()]


def print_run_summary(recipe: Recipe, exit_code: int, out=sys.stdout, node_rank: int | None = None) -> None:
    run_dir = RunDir(Path(recipe.output_dir))
    on_node = "" if node_rank is None else f" --node-rank {node_rank}"
    if exit_code != 0:
        print(f"\ndstk train: the workers failed (exit {exit_code}); their output is above. "
              f"Continue from the last checkpoint with: dstk train {run_dir.recipe} resume=auto{on_node}"
              + (" (on every node)" if on_node else ""), file=sys.stderr)
        return
    if node_rank:  # node 0 keeps the metrics, the model and the summary
        print(f"\ndstk train: node {node_rank} finished; node 0 reports the run", file=out)
        return
    run = run_dir.read_run()
    lines = _metrics(run_dir)
    losses = [line["loss"] for line in lines if "loss" in line]
    speed = [line["tokens_per_s"] for line in lines if "tokens_per_s" in line]
    result = run.get("result", {})
    p = recipe.parallel
    layout = f"ZeRO-{p.zero_stage}" + (f", {p.pipeline_stages} pipeline stages" if p.pipeline_stages > 1 else "") \
        + (f", tensor parallel {p.tensor_parallel}" if p.tensor_parallel > 1 else "")
    print(f"\ndstk train: {run['status']} {result.get('steps')} steps of {run['model']['name']} "
          f"on {p.nproc} rank(s), {layout}", file=out)
    if "pipeline" in run["parallel"]:
        pipe = run["parallel"]["pipeline"]
        print(f"  {pipe['summary']}\n  bubble        {pipe['bubble_fraction']:.1%} of each step "
              f"({pipe['micro_batches']} micro-batches)", file=out)
    if losses:
        print(f"  loss          {losses[0]:.4f} -> {losses[-1]:.4f}", file=out)
    before, after = result.get("eval_before"), result.get("eval_after")
    if before and after:
        print(f"  eval loss     {before['loss']:.4f} -> {after['loss']:.4f}", file=out)
        print(f"  exact match   {before['accuracy']:.1%} -> {after['accuracy']:.1%} "
              f"({after['records']} held-out records)", file=out)
    if speed:
        print(f"  tokens/s      {sum(speed) / len(speed):.0f} (mean of logged windows)", file=out)
    params = run["parallel"]["parameters"]
    print(f"  parameters    {params['trainable']:,} trained of {params['total']:,}"
          + (" (LoRA adapters)" if run.get("lora") else ""), file=out)
    if "peak_rss_mb_per_rank" in result:
        print(f"  peak memory   {', '.join(f'{mb:,.0f}' for mb in result['peak_rss_mb_per_rank'])} MiB "
              "resident, by rank", file=out)
    print(f"  audit         {run['audit']['verdict']}  {run['audit'].get('report', '')}", file=out)
    for label, path in (("model", run_dir.final), ("metrics", run_dir.metrics),
                        ("checkpoints", run_dir.checkpoints), ("lineage", run_dir.run_json)):
        print(f"  {label:<13} {path}", file=out)
