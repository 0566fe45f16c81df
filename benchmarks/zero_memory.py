"""Per-rank memory under ZeRO 0-3 and CPU offload, against the ZeRO paper's formulas and the HF Trainer.

    python benchmarks/zero_memory.py                  # ~100M LLaMA, 2 ranks, 2 steps per layout
    python benchmarks/zero_memory.py --layers 4 --no-trainer
    python benchmarks/zero_memory.py --precision bf16 --layouts ZeRO-3

Each layout is a real ``dstk train`` run and a real HF Trainer run (``hf_trainer_worker.py``) with
the DeepSpeed config dstk resolved for it: same model, records, ranks and steps. Per rank:

* model states: the bytes of every tensor the engine's parameters and optimizer hold after the
  steps (``toolkit.training.metrics.model_state_mb``), both sides measured the same way. After the optimizer
  step stages 0-2 have freed the gradients, so the theory they are set beside is weights +
  optimizer state: for Ψ parameters on N ranks, wΨ + kΨ for stage 0, wΨ + kΨ/N for 1 and 2, with
  w=4 bytes per weight in fp32 (2 in bf16) and k=8 for Adam's moments, plus 4 for the fp32 master
  copy that DeepSpeed's ZeRO optimizers (stages 1-3) keep even in fp32 (and its bf16 optimizer at
  stage 0). Stage 3 keeps its gradient partition allocated between steps: (2w + k)Ψ/N. Its reduce
  bucket (``reduce_bucket_size`` elements, also kept) is not in the theory: dstk sizes it from the
  hidden size (4 MiB here). The ZeRO paper's mixed-precision formulas, gradients included (16Ψ,
  4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N), are printed beside them.
  Goal: within 1.15x of theory.
* peak: the largest resident memory of the rank. Without an accelerator the "device" is host
  memory, so offload moves nothing off it here; its row shows what offload costs in host memory.
  Goal: dstk's ZeRO-3 peak at most 0.56x the Trainer's (the Trainer builds the whole model on
  every rank before partitioning it; dstk creates it partitioned). Both peak later, in the
  optimizer steps, so the verdict is printed beside the floor no loading path goes under: the
  rank's memory before the model plus its model states.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import hf_trainer_worker
from lora_memory import build_model, train
from scratch import add_keep_flag, scratch

NPROC = 2
LAYOUTS = {"ZeRO-0": (0, "none"), "ZeRO-1": (1, "none"), "ZeRO-2": (2, "none"), "ZeRO-3": (3, "none"),
           "ZeRO-3 offload": (3, "cpu")}
GOALS = {"theory": 1.15, "zero3_vs_trainer": 0.56}


def after_step_mb(params: int, stage: int, precision: str = "fp32", ranks: int = NPROC) -> float:
    """Model states after a step, sharded as ZeRO ``stage`` shards them.

    Weights take 2 bytes in bf16, 4 in fp32; Adam's moments 8, and the fp32 master copy 4 wherever
    DeepSpeed keeps one (ZeRO 1-3, and its bf16 optimizer at stage 0). Stages 0-2 free the
    gradients after the step; stage 3 keeps its gradient partition, in the weights' dtype, in a
    flat buffer it allocates once (DeepSpeed's ``grad_partitions_flat_buffer``), so it counts there.
    """
    weights = 2 if precision == "bf16" else 4
    optimizer = 8 + (4 if stage > 0 or precision == "bf16" else 0)
    per_param = {0: weights + optimizer, 1: weights + optimizer / ranks, 2: weights + optimizer / ranks,
                 3: (2 * weights + optimizer) / ranks}[stage]
    return params * per_param / 2**20


def paper_mb(params: int, stage: int, ranks: int = NPROC) -> float:
    """The ZeRO paper's model states with mixed-precision Adam, gradients included."""
    per_param = {0: 16, 1: 4 + 12 / ranks, 2: 2 + 14 / ranks, 3: 16 / ranks}[stage]
    return params * per_param / 2**20


def trainer_memory(model: Path, run: Path, out: Path, steps: int) -> dict:
    """The HF Trainer on dstk's resolved config and encoded records of ``run``."""
    info = json.loads((run / "run.json").read_text())
    return hf_trainer_worker.run(model, info["data"]["train"]["path"], {"format": "instruction"}, 32,
                                 run / "ds_config.json", out, steps, warmup_steps=0, save=False, nproc=NPROC)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=13, help="decoder layers (default 13: ~100M parameters)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-trainer", action="store_true", help="dstk's runs only")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), metavar="LAYOUT",
                        help=f"a subset of {', '.join(map(repr, LAYOUTS))}")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32 (the recipe default) or bf16")
    add_keep_flag(parser, "several GB")
    args = parser.parse_args()

    with scratch("dstk-zero-mem-", args.keep) as work:
        print("\n".join(measure(work, args)))
    return 0


def measure(work: Path, args: argparse.Namespace) -> list[str]:
    """Print the table, a row per layout as it is measured; return the verdicts."""
    params = build_model(work / "model", args.layers)
    precision = args.precision
    print(f"LLaMA of {params / 1e6:.1f}M parameters, {NPROC} ranks, {precision}, {args.steps} steps; MiB per rank "
          f"(the larger of the two ranks)")
    header = (f"{'layout':15}{'paper':>7}{'theory':>8}{'dstk states':>12}{'/theory':>8}{'dstk peak':>10}"
              f"{'Trainer states':>15}{'/theory':>8}{'Trainer peak':>13}{'peak dstk/Tr':>13}")
    print(header + "\n" + "-" * len(header))
    verdicts = []
    for name in args.layouts:
        stage, offload = LAYOUTS[name]
        run = work / f"dstk-z{stage}-{offload}"
        mine = train(work / "model", run, stage, [f"parallel.offload={offload}", f"train.precision={precision}"],
                     args.steps)
        theirs = None if args.no_trainer else trainer_memory(work / "model", run, work / f"trainer-z{stage}-{offload}",
                                                            args.steps)
        expected = after_step_mb(params, stage, precision)
        states, peak = max(mine["model_state_mb_per_rank"]), max(mine["peak_rss_mb_per_rank"])
        row = f"{name:15}{paper_mb(params, stage):>7.0f}{expected:>8.0f}{states:>12.0f}{states / expected:>8.2f}{peak:>10.0f}"
        if theirs is not None:
            t_states, t_peak = max(theirs["model_state_mb_per_rank"]), max(theirs["peak_rss_mb_per_rank"])
            row += f"{t_states:>15.0f}{t_states / expected:>8.2f}{t_peak:>13.0f}{peak / t_peak:>12.2f}x"
        print(row, flush=True)
        if offload == "none":
            verdicts.append(f"{name}: dstk model states {states / expected:.2f}x theory (goal <= {GOALS['theory']}): "
                            f"{'met' if states / expected <= GOALS['theory'] else 'NOT met'}")
        if name == "ZeRO-3" and theirs is not None:
            ratio, allowed = peak / t_peak, GOALS["zero3_vs_trainer"] * t_peak
            # what no loading path can go below: the process before the model, plus the model states
            floor = max(before + held for before, held in zip(mine["rss_before_model_mb_per_rank"],
                                                               mine["model_state_mb_per_rank"]))
            verdicts.append(f"ZeRO-3 peak: dstk {ratio:.2f}x the Trainer's (goal <= {GOALS['zero3_vs_trainer']}, "
                            f"{allowed:.0f} MiB): {'met' if ratio <= GOALS['zero3_vs_trainer'] else 'NOT met'}; "
                            f"memory before the model + model states: {floor:.0f} MiB")
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
