"""Per-rank memory of full fine-tuning against LoRA and QLoRA (NF4) on the same ~100M model.

    python benchmarks/lora_memory.py                  # ZeRO-2 and ZeRO-3, 2 ranks, 3 steps each
    python benchmarks/lora_memory.py --stages 3 --layers 4

Each variant is a real ``dstk train`` run (2 ranks, the built-in reverse task, sequences of 32
tokens). Two figures per rank, both from the run's ``run.json``:

* model states: the bytes of every tensor the rank's parameters and optimizer hold after
  training (weights, gradients, Adam moments, fp32 master copies; ``toolkit.training.metrics.model_state_mb``),
  what the ZeRO paper's formulas predict. The goal (issue 6) is on this figure: QLoRA at most
  0.35x the full fine-tune's.
* peak: the largest resident memory above what the process held before the model was loaded;
  on a CPU the accelerator's memory is this resident memory. It includes loading transients.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from scratch import add_keep_flag, scratch

GOAL = 0.35
VARIANTS = {"full": [], "lora": ["lora.enabled=true"],
            "qlora-nf4": ["lora.enabled=true", "lora.quantize_base=nf4"]}


def build_model(folder: Path, layers: int) -> int:
    """A LLaMA of ~7.7M parameters per layer (width 768, FFN 2304), sized to the built-in tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from toolkit.data.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2304,
                                  num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=12,
                                  max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def train(model: Path, out: Path, stage: int, variant: list[str], steps: int) -> dict:
    command = [sys.executable, "-m", "toolkit.cli", "train", f"model={model}", f"output_dir={out}",
               f"parallel.zero_stage={stage}", f"train.max_steps={steps}", "train.seq_len=32",
               "train.micro_batch_size=4", "train.log_steps=1", "data.eval=null", *variant]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    return {**run["result"], "parameters": run["parallel"]["parameters"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], help="ZeRO stages (default 2 3)")
    parser.add_argument("--layers", type=int, default=13, help="decoder layers (default 13: ~100M parameters)")
    parser.add_argument("--steps", type=int, default=3)
    add_keep_flag(parser, "some 3 GB")
    args = parser.parse_args()

    with scratch("dstk-lora-mem-", args.keep) as work:
        print("\n".join(measure(work, args)))
    return 0


def measure(work: Path, args: argparse.Namespace) -> list[str]:
    """Print the table, a row per run as it is measured; return the verdicts."""
    params = build_model(work / "model", args.layers)
    print(f"LLaMA of {params / 1e6:.1f}M parameters, 2 ranks, {args.steps} steps; MiB per rank: "
          "model states, and in brackets peak resident memory above the footprint before loading")
    header = f"{'ZeRO':>5}  {'variant':10}{'trained':>12}{'rank 0':>16}{'rank 1':>16}{'vs full':>9}"
    print(header + "\n" + "-" * len(header))
    verdicts = []
    for stage in args.stages:
        full = None
        for name, variant in VARIANTS.items():
            result = train(work / "model", work / f"z{stage}-{name}", stage, variant, args.steps)
            states = result["model_state_mb_per_rank"]
            above = [peak - start for peak, start in zip(result["peak_rss_mb_per_rank"],
                                                        result["rss_before_model_mb_per_rank"])]
            full = full or max(states)
            ratio = max(states) / full
            cells = "".join(f"{m:>8.0f} ({a:>5.0f})" for m, a in zip(states, above))
            print(f"{stage:>5}  {name:10}{result['parameters']['trainable']:>12,}{cells}{ratio:>8.2f}x")
            if name == "qlora-nf4":
                verdicts.append(f"ZeRO-{stage}: QLoRA model states {ratio:.2f}x of full <= {GOAL}: "
                                f"{'met' if ratio <= GOAL else 'NOT met'}")
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
