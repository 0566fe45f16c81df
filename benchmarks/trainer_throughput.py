"""dstk against the Hugging Face Trainer: real-token throughput, model-FLOP utilisation, eval loss.

    python benchmarks/trainer_throughput.py                 # variable-length and fixed-length data
    python benchmarks/trainer_throughput.py --steps 30 --data variable --repeats 3

Every side trains the same ~70M-parameter LLaMA (width 768, 9 layers, a 4,096-token BPE trained on
the data) from the same initial weights, with the same resolved DeepSpeed config (ZeRO-2, AdamW,
warm-up + cosine; bf16 where the cores multiply bf16 fast, else fp32), on 2 CPU ranks or one rank
per GPU (--nproc; benchmarks/gpu_check.sh runs a 16-layer 119M model on one GPU), the same global
batch size and the same number of steps, and the same encoded records (prompt masked, EOS
appended, at most --seq-len tokens). The sides:

* dstk: ``dstk train`` as a user would run it for speed: ``train.compile=true``, and on the
  variable data ``train.packing=true``.
* Trainer: the HF Trainer as it comes (``hf_trainer_worker.py``), launched by ``deepspeed``.
* Trainer+compile: the same with its own ``torch_compile=True`` (--no-trainer-compile drops it).

* variable: GSM8K (``../shared/data/gsm8k`` beside the checkout) as instruction data, else generated
  records with a GSM8K-like length spread. The Trainer pads each micro-batch to its longest
  record; dstk packs.
* fixed: text records that all fill --seq-len tokens, so no side pads.

Throughput counts real (non-padding) tokens per second over the steps after --warmup-steps, timed
from the start of the first of them to the end of the last, logging included (dstk: the
``elapsed_s`` of its metrics lines; the Trainer: its callbacks); compilation falls in the warm-up
steps, and the ``wall`` column gives each run's whole time, start-up and compilation included.
The sides take turns over --repeats rounds, in reversed order every other round, so that a slow
spell of a shared machine falls on every side; a side's figure is its tokens over its seconds in
all rounds. Model-FLOP utilisation is 6 x parameters x tokens/s over the matmul peak of this
machine's cores or GPUs in the training precision, measured here in the same run (a 1024x1024
matmul on one core or an 8192x8192 one on a GPU, times the ranks). CPUs without bf16 units (no AVX512-BF16 or AMX) multiply bf16 some 50x
slower than fp32. Each side's final model (of its last round) is scored by the same evaluator
(``toolkit.inference.evaluate``, token-mean loss) on held-out records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import hf_trainer_worker
from scratch import add_keep_flag, scratch

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
GOALS = {"variable": 2.0, "fixed": 1.5}


def load_gsm8k(limit: int | None = None) -> tuple[list[dict], list[dict]]:
    def read(name):
        rows = [json.loads(line) for line in (GSM8K / name).read_text().splitlines() if line.strip()]
        return [{"prompt": r["question"], "response": " " + r["answer"]} for r in rows]

    return read("train.jsonl")[:limit], read("test.jsonl")[:200]


def generated(count: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Word-salad instruction records with GSM8K's length spread (prompt ~45, answer ~55 words, long tail)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = [w for w in "the of a to and in is it that for was on are with as his they at be this from have or "
             "by one had not but what all were when we there can an your which their said if do will each about "
             "how up out them then she many some so these would other into has more her two like him see time "
             "could no make than first been its who now people my made over did down only way find use may water "
             "long little very after words called just where most know get through back much before go good new "
             "write our used me man too any day same right look think also around another came come work three "
             "word must because does part even place well such here take why things help put years different "
             "away again off went old number great tell men say small every found still between name should home "
             "big give air line set own under read last never us left end along while might next sound below saw "
             "something thought both few those always looked show large often together asked house world going "
             "want school important until form food keep children feet land side without boy once animals life "
             "enough took sometimes four head above kind began almost live page got earth need far hand high year "
             "mother light parts country father let night following picture being study second eyes soon times "
             "story boys since white days ever paper hard near sentence better best across during today others "
             "sure means knew its try told young miles sun ways thing whole hear example heard several change "
             "answer room sea against top turned learn point city play toward five using himself usually".split()]

    def text(mean_words: float) -> str:
        n = max(3, int(rng.lognormal(np.log(mean_words), 0.45)))
        return " ".join(rng.choice(words, n)) + f" {int(rng.integers(1, 1000))}."

    rows = [{"prompt": text(45), "response": " " + text(55)} for _ in range(count + 200)]
    return rows[:count], rows[count:]


def fixed_length(rows: list[dict]) -> list[dict]:
    """Text records long enough that every one is cut to exactly --seq-len tokens."""
    joined = [" ".join(r["prompt"] + r["response"] for r in rows[i:i + 4]) for i in range(0, len(rows) - 3, 4)]
    return [{"text": t} for t in joined]


def build_model(folder: Path, texts: list[str], layers: int) -> int:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048,
                                  num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=12,
                                  max_position_embeddings=1024, tie_word_embeddings=False,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def matmul_peak_per_rank(dtype: str, seconds: float = 2.0) -> float:
    """FLOP/s of what one rank computes on (a GPU, else one core) on a square matmul in ``dtype``,
    what the model's matmuls could reach: the fastest of the matmuls run in ``seconds``, so that a
    slow spell of a shared machine does not lower the peak and inflate the utilisation set against it."""
    import torch

    if torch.cuda.is_available():
        return _gpu_matmul_peak(dtype, seconds)
    return _core_matmul_peak(dtype, seconds)


def _gpu_matmul_peak(dtype: str, seconds: float, size: int = 8192) -> float:
    import torch

    a, b = (torch.randn(size, size, device="cuda", dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
            for _ in "ab")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fastest, began = float("inf"), time.perf_counter()
    for _ in range(3):  # clocks up, kernels chosen
        a @ b
    while time.perf_counter() - began < seconds:
        start.record()
        a @ b
        end.record()
        end.synchronize()
        fastest = min(fastest, start.elapsed_time(end) / 1e3)
    return 2 * size**3 / fastest


def _core_matmul_peak(dtype: str, seconds: float, size: int = 1024) -> float:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = (torch.randn(size, size, dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype])) for _ in "ab")
    a @ b
    start = time.perf_counter()
    fastest = float("inf")
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - began)
    torch.set_num_threads(threads)
    return 2 * size**3 / fastest


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_dstk(model: Path, train: Path, out: Path, fields: dict, args, packing: bool) -> dict:
    overrides = [f"model={model}", f"output_dir={out}", f"data.train={train}", "data.eval=null",
                 *(f"data.{k}={v}" for k, v in fields.items()), f"parallel.nproc={args.nproc}", "parallel.zero_stage=2",
                 f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch_size}",
                 "train.grad_accum=1", f"train.seq_len={args.seq_len}", "train.lr=3e-4", f"train.precision={args.precision}",
                 "train.log_steps=1", "train.save_steps=0", "train.eval_steps=0", f"train.packing={str(packing).lower()}",
                 "train.compile=true", "train.warmup_ratio=0.1", "train.seed=0"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "train", *overrides], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dstk train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {line["step"]: line for line in lines if "loss" in line}
    timed = [steps[step] for step in range(args.warmup_steps + 1, args.steps + 1)]
    return {"tokens": sum(line["tokens"] for line in timed), "wall_s": wall, "final": out / "final",
            "seconds": timed[-1]["elapsed_s"] - steps[args.warmup_steps]["elapsed_s"]}


def run_trainer(model: Path, train: Path, out: Path, fields: dict, ds_config: Path, args, compile: bool) -> dict:
    start = time.perf_counter()
    figures = hf_trainer_worker.run(model, train, fields, args.seq_len, ds_config, out, args.steps, args.warmup_steps,
                                    nproc=args.nproc, compile=compile)
    return {"tokens": figures["tokens"], "seconds": figures["elapsed_s"], "wall_s": time.perf_counter() - start,
            "final": out}


def eval_loss(model: Path, rows: list[dict], fields: dict, seq_len: int) -> float:
    from toolkit.inference import evaluate
    from toolkit.recipe import DataConfig

    return evaluate(model, rows, fields=DataConfig(**fields), max_length=seq_len, answer_match=False).loss


def compare(name: str, work: Path, rows: list[dict], held_out: list[dict], fields: dict, packing: bool,
            sides: list[str], args) -> dict[str, float]:
    """Run every side --repeats times, taking turns; print each side's figures; return tokens/s by side."""
    train = _write_jsonl(work / f"{name}.jsonl", rows)
    # the shared DeepSpeed config is dstk's resolved one, so dstk runs first in the first round
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_ in range(args.repeats):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            out = work / f"{side}-{name}-{round_}"
            if side == "dstk":
                runs[side].append(run_dstk(work / "model", train, out, fields, args, packing))
            else:
                ds_config = work / f"dstk-{name}-0" / "ds_config.json"
                runs[side].append(run_trainer(work / "model", train, out, fields, ds_config, args,
                                              compile=side == "Trainer+compile"))
    rates = {}
    for side, results in runs.items():
        rates[side] = sum(r["tokens"] for r in results) / sum(r["seconds"] for r in results)
        each = " ".join(f"{r['tokens'] / r['seconds']:.0f}" for r in results)
        loss = eval_loss(results[-1]["final"], held_out, fields, args.seq_len)
        wall = sum(r["wall_s"] for r in results) / len(results)
        mfu = 6 * args.params * rates[side] / args.peak
        print(f"{name:9}{side:16}{rates[side]:>10.0f}{mfu:>8.1%}{loss:>11.4f}{wall:>8.0f}  {each}", flush=True)
        args.rows.append({"data": name, "side": side, "tokens_per_s": rates[side], "mfu": mfu, "eval_loss": loss,
                          "wall_s": wall})
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("variable", "fixed", "both"), default="both")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=2, help="rounds in which every side runs once")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="records per rank per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", type=int, default=9, help="decoder layers (9: ~70M parameters)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 where this machine's cores multiply in bf16 at least twice as fast as fp32")
    parser.add_argument("--no-trainer-compile", action="store_true", help="leave out the Trainer+compile side")
    parser.add_argument("--nproc", type=int, help="ranks (default: the GPUs here, else 2 CPU ranks)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    add_keep_flag(parser, "some 5 GB of checkpoints for both data sets")
    args = parser.parse_args()
    import torch

    if not 1 <= args.warmup_steps < args.steps:
        parser.error("--warmup-steps must be at least 1 and fewer than --steps (timing starts after one)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (each side runs once per round)")

    args.unit = "GPU" if torch.cuda.is_available() else "core"
    args.nproc = args.nproc or torch.cuda.device_count() or 2
    peaks = {dtype: matmul_peak_per_rank(dtype) for dtype in ("fp32", "bf16")}
    if args.precision == "auto":
        args.precision = "bf16" if peaks["bf16"] >= 2 * peaks["fp32"] else "fp32"
    print(f"matmul peak per {args.unit}: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} "
          f"GFLOP/s -> training in {args.precision}")

    args.rows = []
    with scratch("dstk-vs-trainer-", args.keep) as work:
        verdicts = measure(work, args, peaks[args.precision])
    if args.json:
        args.json.write_text(json.dumps({
            "parameters": args.params, "precision": args.precision, "ranks": args.nproc, "rank_unit": args.unit,
            "peak_flops": args.peak, "steps": args.steps, "warmup_steps": args.warmup_steps, "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size, "rows": args.rows}, indent=1) + "\n")
    return 0 if all(verdicts) else 1


def measure(work: Path, args: argparse.Namespace, peak_per_rank: float) -> list[bool]:
    """Print the table and the ratios, data set by data set; return whether each met its goal."""
    needed = args.steps * args.micro_batch_size * args.nproc * 4
    train_rows, eval_rows = load_gsm8k(needed) if GSM8K.is_dir() else generated(needed)
    source = "GSM8K" if GSM8K.is_dir() else "generated GSM8K-like records"
    args.params = build_model(work / "model", [r["prompt"] + r["response"] for r in train_rows], args.layers)
    args.peak = args.nproc * peak_per_rank
    print(f"LLaMA {args.params / 1e6:.1f}M parameters, ZeRO-2 {args.precision}, {args.nproc} ranks, {args.steps} steps "
          f"of {args.micro_batch_size * args.nproc} records, seq_len {args.seq_len}, {args.repeats} rounds; "
          f"{args.precision} matmul peak of {args.nproc} {args.unit}s: {args.peak / 1e9:.0f} GFLOP/s")
    sets = {"variable": (train_rows, eval_rows, {"format": "instruction"}, True),
            "fixed": (fixed_length(train_rows), fixed_length(eval_rows), {"format": "text"}, False)}
    sides = ["dstk", "Trainer"] + ([] if args.no_trainer_compile else ["Trainer+compile"])
    header = f"{'data':9}{'side':16}{'tokens/s':>10}{'MFU':>8}{'eval loss':>11}{'wall s':>8}  tokens/s of each round"
    print(header + "\n" + "-" * len(header))
    verdicts = []
    for name in ("variable", "fixed") if args.data == "both" else (args.data,):
        rows, held_out, fields, packing = sets[name]
        rates = compare(name, work, rows, held_out, fields, packing, sides, args)
        for peer in sides[1:]:
            ratio = rates["dstk"] / rates[peer]
            goal = f" (goal >= {GOALS[name]}x)" if peer == "Trainer" else ""
            print(f"{name:9}dstk / {peer}: {ratio:.2f}x real tokens/s{goal} on {source}", flush=True)
        verdicts.append(rates["dstk"] / rates["Trainer"] >= GOALS[name])
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
