"""`dstk export MODEL_OR_RUN --quant nf4|fp4|int8`: a verified bitsandbytes export with export.json."""

from __future__ import annotations

import argparse

from toolkit.commands.eval import add_data_arguments, data_fields
from toolkit.exporting import COMPUTE_DTYPES, QUANT_TYPES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="quantize a model or run with bitsandbytes, verify the reload, write export.json",
        description="Quantize a model directory, LoRA adapter or run (its final/) with bitsandbytes. The export is "
        "reloaded in a fresh process and checked against the in-memory model and the source before it appears at OUT.",
    )
    parser.add_argument("source", metavar="MODEL_OR_RUN", help="model directory, LoRA adapter directory or run directory")
    parser.add_argument("--quant", required=True, choices=QUANT_TYPES, help="nf4 / fp4: 4-bit blockwise; int8: LLM.int8")
    parser.add_argument(
        "--double-quant",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also quantize the 4-bit block scales (default: on for nf4/fp4)",
    )
    parser.add_argument("-o", "--out", metavar="OUT", help="export directory, must not exist (default: RUN/export-QUANT or MODEL-QUANT)")
    parser.add_argument(
        "--keep-fp", default="lm_head", metavar="M1,M2", help="comma-separated modules left unquantized (default: lm_head; '' for none)"
    )
    parser.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, help="4-bit compute dtype (default: the source's)")
    parser.add_argument("--eval-data", metavar="F", help="eval set whose loss and perplexity are measured before "
                        "and after quantization (one forward pass per batch)")
    parser.add_argument("--eval-limit", type=int, metavar="N", help="score only the first N records of --eval-data")
    parser.add_argument("--answer-match", action="store_true",
                        help="also generate each instruction record's answer before and after and compare it with the "
                        "reference (one generation per record: minutes on a CPU for long answers)")
    parser.add_argument(
        "--max-loss-rise", type=float, metavar="FRACTION",
        help="also keep in full precision the layers quantization hurts most, as few as keep the eval loss "
        "within this relative rise (e.g. 0.03); needs --eval-data",
    )
    add_data_arguments(parser)
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code shipped in the source")
    parser.set_defaults(run=run)


def _run_data(source: str):
    """A run's ``data`` section (its field names), when the source is a run directory."""
    from pathlib import Path

    from toolkit.recipe import load_recipe
    from toolkit.rundir import RunDir

    recipe = RunDir(Path(source)).recipe
    return load_recipe(recipe).data if recipe.is_file() else None


def run(args: argparse.Namespace) -> int:
    from toolkit.exporting.export import export

    fields = None
    if args.eval_data is not None:
        from toolkit.data.records import load_records

        fields = data_fields(args, load_records(args.eval_data), base=_run_data(args.source))
    result = export(
        args.source,
        args.quant,
        args.out,
        double_quant=args.double_quant,
        keep_fp=tuple(name for name in args.keep_fp.split(",") if name),
        compute_dtype=args.compute_dtype,
        eval_data=args.eval_data,
        eval_fields=fields,
        eval_limit=args.eval_limit,
        answer_match=args.answer_match,
        max_loss_rise=args.max_loss_rise,
        trust_remote_code=args.trust_remote_code,
    )
    print(result.summary())
    return 0
