"""Export quality: size and eval-loss change per quant type, and generation speed with and without
the KV cache, for the trained built-in default or a model / run directory given as argument.

    python benchmarks/export_quality.py                      # runs/tiny if trained, else trains it here
    python benchmarks/export_quality.py runs/tiny --limit 128
    python benchmarks/export_quality.py MODEL --eval-data ../shared/data/gsm8k/test.jsonl \\
        --prompt-field question --response-field answer

Goals (issue 5): NF4 quantized layers at most 0.30x their fp16 size; eval loss up by at most 3%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from toolkit import inference
from toolkit.data import builtin
from toolkit.data.batches import EncodedSet, collate
from toolkit.data.formats import encode
from toolkit.data.records import load_records
from toolkit.exporting.export import export
from toolkit.exporting.source import resolve
from toolkit.models.presets import build_preset
from toolkit.recipe import DataConfig

DEFAULT_RUN = Path("runs/tiny")  # output_dir of the built-in `tiny` recipe
NF4_SIZE_GOAL, LOSS_RISE_GOAL = 0.30, 0.03
# (quant, double quantization, --max-loss-rise): the last nf4 row keeps the layers quantization
# hurts most in full precision, as few as hold the goal's loss rise
VARIANTS = [("nf4", True, None), ("nf4", False, None), ("fp4", True, None), ("fp4", False, None),
            ("int8", False, None), ("nf4", True, LOSS_RISE_GOAL)]
REPEATS = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="model or run directory (default: runs/tiny, else trained here)")
    parser.add_argument("--eval-data", help="eval set (default: the built-in reverse task's held-out split)")
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--limit", type=int, default=64, help="eval records (default 64)")
    parser.add_argument("--steps", type=int, default=300, help="training steps when training here (default 300)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per prompt for speed (default 64)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dstk-bench-"))
    fields = DataConfig(format="instruction", prompt_field=args.prompt_field, response_field=args.response_field)
    eval_path = Path(args.eval_data) if args.eval_data else builtin.generate("reverse", "eval", work / "data")
    every = list(load_records(str(eval_path)))
    # the loss budget's search picks layers on `records`; `unseen` re-scores that choice
    records, unseen = every[: args.limit], every[args.limit: 2 * args.limit]
    source = Path(args.source) if args.source else DEFAULT_RUN
    if not args.source and not (DEFAULT_RUN / "final").is_dir():
        print(f"{DEFAULT_RUN}/final not found: training tiny-llama on builtin:reverse for {args.steps} steps here")
        source = train_default(work / "tiny-llama", args.steps, work / "data")

    rows = []
    for quant, double_quant, budget in VARIANTS:
        name = f"{quant}{' +dq' if double_quant else ''}{f' {budget:.0%}' if budget else ''}"
        result = export(source, quant, work / name.replace(" ", "").replace("+", "-").replace("%", "pc"),
                        double_quant=double_quant, eval_data=records, eval_fields=fields, max_loss_rise=budget)
        rows.append((name, result))
    # the full-precision model itself where the source is a run (its final/) or an adapter (its base)
    full_precision = resolve(source).model_dir
    print_quality(source, rows)
    print_unseen(full_precision, rows, unseen, fields)
    print_speed(full_precision, [(name, r.out_dir) for name, r in rows], [r[fields.prompt_field] for r in records[:8]],
                args.new_tokens)
    print(f"exports and data kept in {work}")
    return 0


def train_default(folder: Path, steps: int, data_dir: Path) -> Path:
    """The built-in default on one process: tiny-llama on builtin:reverse, as recipes/tiny.yaml sets it."""
    build_preset("tiny-llama", folder, seed=0)
    loaded = inference.load(folder)
    model, tokenizer = loaded.model.train(), loaded.tokenizer
    fields = DataConfig(format="instruction")
    records = load_records(str(builtin.generate("reverse", "train", data_dir)))
    examples = [encode(r, tokenizer, fields, 32) for r in records]
    data = EncodedSet([e["input_ids"] for e in examples], [e["labels"] for e in examples])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup)))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(steps):
        batch = collate(data, rng.choice(len(data), 32, replace=False), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    model.save_pretrained(folder)
    return folder


def print_quality(source: Path, rows) -> None:
    print(f"\nexport quality of {source}")
    header = f"{'quant':10}{'disk':>8}{'memory':>8}{'q-layers':>10}{'whole':>8}{'loss':>9}{'loss after':>11}{'rise':>8}"
    header += f"{'AM':>7}{'AM after':>9}{'vs src':>8}{'reload':>9}{'time s':>8}"
    print(header + "\n" + "-" * len(header))
    for name, result in rows:
        r = result.report
        size, quality, check = r["size"], r["quality"], r["verification"]
        before, after = quality["before"], quality["after"]
        print(f"{name:10}{size['disk_ratio']:>7.3f}x{size['memory_ratio']:>7.3f}x{size['quantized_weights_fp16_ratio']:>9.3f}x"
              f"{size['whole_model_fp16_ratio']:>7.3f}x{before['loss']:>9.4f}{after['loss']:>11.4f}{quality['loss_change']:>+8.2%}"
              f"{_em(before):>7}{_em(after):>9}{check['quantized_vs_source']:>8.4f}{check['reload_vs_memory']:>9.1e}"
              f"{r['time_s']['total']:>8.1f}")
    print("disk / memory: against the source as stored; q-layers: quantized layers against the same layers in fp16;"
          " whole: export on disk against the whole model in fp16; vs src / reload: relative probe-logit error.")
    for name, result in rows:
        if not name.startswith("nf4 +dq"):
            continue
        r = result.report
        size_ratio, rise = r["size"]["quantized_weights_fp16_ratio"], r["quality"]["loss_change"]
        kept = (r["quantization"]["keep_search"] or {}).get("kept", [])
        print(f"goals, {name}: q-layers {size_ratio:.3f}x <= {NF4_SIZE_GOAL}: {_verdict(size_ratio <= NF4_SIZE_GOAL)};"
              f" loss rise {rise:+.2%} <= {LOSS_RISE_GOAL:.0%}: {_verdict(rise <= LOSS_RISE_GOAL)}; whole model"
              f" {r['size']['whole_model_fp16_ratio']:.3f}x fp16, {r['quantization']['quantized_modules']} layers quantized"
              + (f", {len(kept)} kept in full precision: {', '.join(kept)}" if kept else ""))


def print_unseen(source: Path, rows, unseen: list[dict], fields: DataConfig) -> None:
    """Each export's loss rise on eval records the loss budget's search did not see."""
    if not unseen:
        return
    base = inference.evaluate(source, unseen, fields=fields, answer_match=False).loss
    rises = ", ".join(f"{name} {inference.evaluate(r.out_dir, unseen, fields=fields, answer_match=False).loss / base - 1:+.2%}"
                      for name, r in rows)
    print(f"loss rise on {len(unseen)} other eval records (not seen by the budget's search): {rises}")


def print_speed(source: Path, exports, prompts: list[str], new_tokens: int) -> None:
    print(f"\ngeneration, batch of {len(prompts)} prompts, {new_tokens} new tokens each (EOS ignored), {torch.get_num_threads()} threads")
    print(f"{'model':10}{'KV cache tok/s':>16}{'no cache tok/s':>16}{'speed-up':>10}")
    for name, model_dir in [("source", source), *exports]:
        loaded = inference.load(model_dir)
        # Decode a fixed length so both modes do the same work: a model that has learnt to stop
        # would otherwise end after a few tokens, where the cache hardly matters.
        loaded.model.generation_config.eos_token_id = None
        rates = []
        for use_cache in (True, False):
            inference.generate(loaded, prompts, max_new_tokens=2, use_cache=use_cache)  # warm-up
            # Best of three: the machine is shared, and interference only ever slows a run down.
            seconds = min(
                inference.generate(loaded, prompts, max_new_tokens=new_tokens, use_cache=use_cache).seconds
                for _ in range(REPEATS)
            )
            rates.append(len(prompts) * new_tokens / seconds)
        print(f"{name:10}{rates[0]:>16.1f}{rates[1]:>16.1f}{rates[0] / rates[1]:>9.2f}x")


def _em(result: dict) -> str:
    return "-" if result["answer_match"] is None else f"{result['answer_match']:.3f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    sys.exit(main())
