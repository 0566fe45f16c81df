"""`dstk eval MODEL --data F`: loss, perplexity and answer match of a full or quantized model."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="loss, perplexity and answer match of a model on a data set",
        description="Score a full-precision or bitsandbytes-quantized model directory on an eval set, "
        "encoded as training encodes it (text / instruction / chat).",
    )
    parser.add_argument("model", metavar="MODEL", help="Hugging Face model directory (full or quantized)")
    parser.add_argument("--data", required=True, metavar="F", help="eval set: JSONL/JSON/CSV/Parquet file or folder")
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="records per forward pass (default 8)")
    parser.add_argument("--max-length", type=int, help="tokens kept per record (default: the model's context)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument("--no-answer-match", dest="answer_match", action="store_false",
                        help="skip generating an answer per instruction record (the slow part)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code shipped in MODEL")
    parser.set_defaults(run=run)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The format and field-name flags shared by `dstk eval` and `dstk export` (recipe keys data.*)."""
    parser.add_argument("--format", choices=("text", "instruction", "chat"), help="default: told by the first record")
    parser.add_argument("--text-field", help="text field (format text; default: text)")
    parser.add_argument("--prompt-field", help="prompt field (format instruction; default: prompt)")
    parser.add_argument("--response-field", help="response field (format instruction; default: response)")
    parser.add_argument("--messages-field", help="messages field (format chat; default: messages)")


def data_fields(args: argparse.Namespace, records, base=None):
    """The recipe-style ``data`` section the flags describe, over ``base`` (a run's ``data`` section;
    default: the default field names); the format told by ``records`` unless given."""
    from toolkit.inference import infer_fields
    from toolkit.recipe import DataConfig

    base = base or DataConfig()
    names = {k: getattr(args, k) or getattr(base, k) for k in ("text_field", "prompt_field", "response_field",
                                                               "messages_field")}
    return DataConfig(format=args.format, **names) if args.format else infer_fields(records, DataConfig(**names))


def run(args: argparse.Namespace) -> int:
    from toolkit.data.records import load_records
    from toolkit.inference import evaluate, load

    records = list(load_records(args.data))  # bad data fails before the model loads
    result = evaluate(
        load(args.model, trust_remote_code=args.trust_remote_code),
        records,
        fields=data_fields(args, records),
        batch_size=args.batch_size,
        max_length=args.max_length,
        limit=args.limit,
        answer_match=args.answer_match,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"eval {args.model} on {args.data}: {result.examples} records, {result.tokens} scored tokens, {result.seconds:.1f} s")
    print(f"  loss        {result.loss:.4f}")
    print(f"  perplexity  {result.perplexity:.3f}")
    if result.answer_match is not None:
        print(f"  answer match {result.answer_match:.3f} ({result.answered} answered)")
    return 0
