"""`dstk generate MODEL --prompt TEXT`: batched, KV-cached generation, streamed for one prompt."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue prompts with a full or quantized model",
        description="Generate from a full-precision or bitsandbytes-quantized model directory. "
        "Several prompts run as one left-padded batch; one prompt is streamed as it is decoded.",
    )
    parser.add_argument("model", metavar="MODEL", help="Hugging Face model directory (full or quantized)")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most new tokens per prompt (default 64)")
    parser.add_argument("--sample", dest="do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50; 0: off)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed, so sampled outputs repeat (default 0)")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false", help="recompute attention every step (slow; for comparison)")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="print a single prompt's output only at the end")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code shipped in MODEL")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from toolkit.inference import generate

    streaming = args.stream and len(args.prompt) == 1
    result = generate(
        args.model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stream=(lambda text: print(text, end="", flush=True)) if streaming else None,
        use_cache=args.use_cache,
        trust_remote_code=args.trust_remote_code,
    )
    if streaming:
        print()
    else:
        for i, (prompt, text) in enumerate(zip(args.prompt, result.texts)):
            print(f"[{i}] {prompt}{text}")
    print(f"{result.new_tokens} new tokens in {result.seconds:.2f} s ({result.tokens_per_s:.1f} tokens/s)", file=sys.stderr)
    return 0
