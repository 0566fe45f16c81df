"""The end-of-run report: ``report.md`` and ``report.png`` in the run directory, and the console summary.

Both are made from what the run directory already holds (``run.json`` and ``metrics.jsonl``), so
the report says what the files say. Rank 0 writes the report at the end of every finished run,
whatever started it; the ``dstk train`` console summary prints the same rows and says where it is.
"""

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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _layout(parallel: dict) -> str:
    return f"ZeRO-{parallel['zero_stage']}" \
        + (f" (offload {parallel['offload']})" if parallel.get("offload", "none") != "none" else "") \
        + (f", {parallel['pipeline_stages']} pipeline stages" if parallel["pipeline_stages"] > 1 else "") \
        + (f", tensor parallel {parallel['tensor_parallel']}" if parallel["tensor_parallel"] > 1 else "")


def _heading(run: dict) -> str:
    return (f"{run['status']} {run.get('result', {}).get('steps')} steps of {run['model']['name']} "
            f"on {run['parallel']['nproc']} rank(s), {_layout(run['parallel'])}")


def _by_rank(mib: list[float]) -> str:
    return ", ".join(f"{mb:,.0f}" for mb in mib)


def _held_out(score: dict) -> str:
    truncated = score.get("truncated", 0)
    return f"{score['records']} held-out records" + (
        f"; {truncated} more have no response within train.seq_len" if truncated else "")


def rows(run: dict, lines: list[dict]) -> list[tuple[str, str]]:
    """The report's (label, value) rows: the same on the console and in report.md."""
    found: list[tuple[str, str]] = []
    parallel, result = run["parallel"], run.get("result", {})
    if len(run.get("layouts", [])) > 1:  # resumed on other ranks, another ZeRO stage or pipeline split
        found.append(("layouts", "; ".join(f"from step {entry['from_step']}: {entry['nproc']} rank(s), {_layout(entry)}"
                                            for entry in run["layouts"])))
    if "pipeline" in parallel:
        pipe = parallel["pipeline"]
        found += [("pipeline", pipe["summary"]),
                  ("bubble", f"{pipe['bubble_fraction']:.1%} of each step ({pipe['micro_batches']} micro-batches)")]
    losses = [line["loss"] for line in lines if "loss" in line]
    if losses:
        found.append(("loss", f"{losses[0]:.4f} -> {losses[-1]:.4f}"))
    before, after = result.get("eval_before"), result.get("eval_after")
    if before and after:
        found += [("eval loss", f"{before['loss']:.4f} -> {after['loss']:.4f}"),
                  ("response match", f"{before['response_match']:.1%} -> {after['response_match']:.1%} "
                                     f"({_held_out(after)})")]
    speed = [line["tokens_per_s"] for line in lines if "tokens_per_s" in line]
    if speed:
        found.append(("tokens/s", f"{_mean(speed):.0f} (mean of logged windows)"))
    comm = [line["comm_share"] for line in lines if "comm_share" in line]
    if comm:
        path = "; collectives through shared memory" if result.get("shm_collectives") else ""
        found.append(("communication", f"{_mean(comm):.0%} of step time (mean of logged steps and ranks){path}"))
    if "runtime" in run:
        rt = run["runtime"]
        found.append(("runtime", f"{rt['accelerator']}, {rt['comm_backend']}, {rt['optimizer']}, "
                                 f"{rt['attention']} attention"))
    params = parallel["parameters"]
    found.append(("parameters", f"{params['trainable']:,} trained of {params['total']:,}"
                                + (" (LoRA adapters)" if run.get("lora") else "")))
    if "peak_rss_mb_per_rank" in result:
        found.append(("peak memory", f"{_by_rank(result['peak_rss_mb_per_rank'])} MiB resident, by rank"))
    if "peak_gpu_mb_per_rank" in result:
        found.append(("peak GPU memory", f"{_by_rank(result['peak_gpu_mb_per_rank'])} MiB allocated, by rank"))
    if "model_state_mb_per_rank" in result:
        found.append(("model states", f"{_by_rank(result['model_state_mb_per_rank'])} MiB "
                                      "(weights, gradients, optimizer), by rank"))
    found.append(("audit", f"{run['audit']['verdict']}  {run['audit'].get('report', '')}".rstrip()))
    return found


def _plot(lines: list[dict], path: Path) -> None:
    # matplotlib's Figure without pyplot: no GUI backend, no global state, safe in any process
    from matplotlib.figure import Figure

    steps = [line for line in lines if "loss" in line]
    evals = [line for line in lines if "eval_loss" in line]
    figure = Figure(figsize=(12, 3.4), layout="constrained")
    loss, speed, comm = figure.subplots(1, 3)
    loss.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train", marker=".")
    if evals:
        loss.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], label="eval", marker="o")
    loss.set(title="loss", xlabel="step", yscale="log")
    loss.legend()
    speed.plot([s["step"] for s in steps], [s["tokens_per_s"] for s in steps], marker=".")
    speed.set(title="real tokens/s (logged window)", xlabel="step", ylim=(0, None))
    shared = [s for s in steps if "comm_share" in s]
    comm.plot([s["step"] for s in shared], [100 * s["comm_share"] for s in shared], marker=".")
    comm.set(title="communication, % of step", xlabel="step", ylim=(0, 100))
    figure.savefig(path, dpi=100)


def write_report(run_dir: RunDir) -> Path:
    """Write ``report.md`` and its picture ``report.png`` for a finished run; returns report.md."""
    run, lines = run_dir.read_run(), _metrics(run_dir)
    _plot(lines, run_dir.report_plot)
    table = "\n".join(f"| {label} | {value} |" for label, value in rows(run, lines))
    text = (f"# {run_dir.root.name}\n\n{_heading(run)}\n\n"
            f"![loss, throughput and communication]({run_dir.report_plot.name})\n\n"
            f"| | |\n|---|---|\n{table}\n\n"
            f"Files: model `final/`, metrics `metrics.jsonl`, checkpoints `checkpoints/`, lineage `run.json`.\n")
    run_dir.report.write_text(text, encoding="utf-8")
    return run_dir.report


def print_run_summary(recipe: Recipe, exit_code: int, out=sys.stdout, node_rank: int | None = None) -> None:
    run_dir = RunDir(Path(recipe.output_dir))
    on_node = "" if node_rank is None else f" --node-rank {node_rank}"
    run = run_dir.read_run() if run_dir.run_json.is_file() else {}
    if exit_code != 0 and run.get("status") == "trained":  # the trained model is kept; see the error
        print(f"\ndstk train: training finished, but {run['error']}", file=sys.stderr)
        return
    if exit_code != 0:
        print(f"\ndstk train: the workers failed (exit {exit_code}); their output is above. "
              f"Continue from the last checkpoint with: dstk train {run_dir.recipe} resume=auto{on_node}"
              + (" (on every node)" if on_node else ""), file=sys.stderr)
        return
    if node_rank:  # node 0 keeps the metrics, the model and the summary
        print(f"\ndstk train: node {node_rank} finished; node 0 reports the run", file=out)
        return
    print(f"\ndstk train: {_heading(run)}", file=out)
    for label, value in rows(run, _metrics(run_dir)):
        print(f"  {label:<14} {value}", file=out)
    for label, path in (("report", run_dir.report), ("model", run_dir.final), ("metrics", run_dir.metrics),
                        ("checkpoints", run_dir.checkpoints), ("lineage", run_dir.run_json)):
        print(f"  {label:<14} {path}", file=out)
