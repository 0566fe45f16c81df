"""`dstk init --model M --data F`: write a commented starter recipe for a model, data and this machine."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "init", help="write a starter recipe for a model and a data file, laid out for this machine",
        description="Write a commented recipe from the built-in recipe of the task, with the model, the data's format "
        "and fields (found from its first record), the parallel layout for this machine (ranks, ZeRO stage, "
        "precision) and one pass over the data filled in; each filled-in line says why. Then run it with "
        "`dstk train RECIPE`.")
    parser.add_argument("--model", required=True, help="a local model directory or hub id (the config is read)")
    parser.add_argument("--data", required=True, metavar="F", help="the training data: a JSONL/JSON/CSV/Parquet file")
    parser.add_argument("--eval", metavar="F", help="held-out records (default: none)")
    parser.add_argument("--task", choices=("sft", "chat", "lora", "qlora"),
                        help="the built-in recipe to start from (default: chat for records with messages, else sft)")
    parser.add_argument("-o", "--out", default="recipe.yaml", metavar="FILE",
                        help="the recipe to write; its name is the run's (default: recipe.yaml)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toolkit.errors import UserError
    from toolkit.plan.starter import starter, write_starter

    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists", "choose another -o FILE, or remove it")
    text, choices = starter(args.model, args.data, args.eval, args.task, out.stem)
    write_starter(out, text)
    width = max(len(c.key) for c in choices)
    print(f"wrote {out}:")
    for choice in choices:
        print(f"  {choice.key:<{width}}  {choice.value}  ({choice.reason})")
    print(f"run it: dstk train {out}")
    return 0
