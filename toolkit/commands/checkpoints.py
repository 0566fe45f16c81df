"""`dstk checkpoints RUN`, `dstk checkpoints convert RUN` and `dstk rollback RUN --to STEP`: a run's
versioned checkpoints, listed, made into a Hugging Face model, or chosen as the resume point."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    listing = subparsers.add_parser(
        "checkpoints", help="list a run's checkpoints, or make a Hugging Face model of one (convert)",
        usage="dstk checkpoints [--json] RUN\n       dstk checkpoints convert RUN [--step N] [--to hf|universal] [-o OUT]",
        description="List every checkpoint of a run directory with its step, loss, eval loss, size and "
        "whether its manifest verifies (each file's size and sha256); `*` marks the resume point. "
        "`convert` writes a Hugging Face model (safetensors) of a checkpoint, or with --to universal DeepSpeed's "
        "universal checkpoint (loadable under any ZeRO stage and number of ranks: RUN/checkpoints/universal/"
        "step_N), offline in one process, after verifying it: of the newest complete one unless --step says which.")
    listing.add_argument("run_dir", metavar="RUN", help="a dstk run directory (or `convert`, then the run)")
    listing.add_argument("convert_run", nargs="?", help=argparse.SUPPRESS)
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.add_argument("--step", type=int, metavar="N", help="convert: the checkpoint's step (default: the newest)")
    listing.add_argument("--to", choices=("hf", "universal"), default="hf",
                         help="convert: a Hugging Face model (hf) or DeepSpeed's universal checkpoint")
    listing.add_argument("-o", "--out", metavar="OUT", help="convert: where (default: RUN/consolidated/step_N)")
    listing.set_defaults(run=run_list)
    rollback = subparsers.add_parser(
        "rollback", help="make an earlier checkpoint the one resume=auto continues from",
        description="Point the run's `latest` at checkpoint STEP after verifying it; later checkpoints "
        "are kept (a resumed run overwrites them as it reaches their steps).")
    rollback.add_argument("run_dir", metavar="RUN", help="a dstk run directory")
    rollback.add_argument("--to", type=int, required=True, metavar="STEP", help="the checkpoint's step")
    rollback.set_defaults(run=run_rollback)


def _checkpoints(run_dir: str) -> Path:
    from toolkit.errors import UserError
    from toolkit.rundir import RunDir

    run = RunDir(Path(run_dir))
    if not run.run_json.is_file():
        raise UserError(f"{run_dir} is not a dstk run directory (no run.json)", "give the run's output_dir")
    if not run.checkpoints.is_dir():
        raise UserError(f"{run_dir} has no checkpoints yet", "they appear at train.save_steps and at the end")
    return run.checkpoints


def run_list(args) -> int:
    from toolkit.checkpoints.store import list_checkpoints
    from toolkit.errors import UserError

    if args.run_dir == "convert":
        return _convert(args)
    if args.convert_run or args.step is not None or args.out:
        raise UserError("--step and -o are for converting a checkpoint",
                        f"dstk checkpoints convert {args.run_dir} [--step N] [-o OUT]")
    entries = list_checkpoints(_checkpoints(args.run_dir))
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0

    def number(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    print(f"  {'step':>8}  {'loss':>8}  {'eval loss':>9}  {'size':>10}  state")
    for entry in entries:
        print(f"{'*' if entry['latest'] else ' '} {entry['step']:>8}  {number(entry['loss']):>8}  "
              f"{number(entry['eval_loss']):>9}  {entry['bytes'] / 2**20:>7.1f} MiB  {entry['state']}")
    return 0


def _convert(args) -> int:
    from toolkit.checkpoints.consolidate import consolidate_offline
    from toolkit.errors import UserError

    if not args.convert_run:
        raise UserError("convert needs the run", "dstk checkpoints convert RUN [--step N] [-o OUT]")
    _checkpoints(args.convert_run)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise UserError(f"{out} already exists", "choose another -o OUT, or remove it")
    if args.to == "universal":
        return _convert_universal(args, out)
    written = consolidate_offline(Path(args.convert_run), args.step, out)
    print(f"dstk checkpoints: wrote {written} (a Hugging Face model: AutoModelForCausalLM.from_pretrained, "
          f"dstk export, dstk eval)")
    return 0


def _convert_universal(args, out: Path | None) -> int:
    from toolkit.checkpoints.store import pick
    from toolkit.checkpoints.universal import convert
    from toolkit.errors import UserError
    from toolkit.rundir import RunDir

    if out is not None:
        raise UserError("a universal checkpoint is written beside its original, where resume=auto finds it",
                        f"drop -o: dstk checkpoints convert {args.convert_run} --to universal")
    run = RunDir(Path(args.convert_run))
    written = convert(pick(_checkpoints(args.convert_run), args.step), run.read_run()["model"]["path"])
    print(f"dstk checkpoints: wrote {written} (DeepSpeed's universal checkpoint: resume=auto loads it under "
          f"any ZeRO stage 1-3 and number of ranks)")
    return 0


def run_rollback(args) -> int:
    from toolkit.checkpoints import store as checkpoint
    from toolkit.rundir import RunDir

    target = checkpoint.rollback(_checkpoints(args.run_dir), args.to)
    print(f"dstk rollback: {target} is the resume point; continue with: "
          f"dstk train {RunDir(Path(args.run_dir)).recipe} resume=auto")
    return 0
