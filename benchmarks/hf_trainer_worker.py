"""One rank of the HF Trainer side of ``benchmarks/trainer_throughput.py`` (run by the deepspeed launcher).

The Trainer gets the DeepSpeed config dstk resolved for the same recipe, the same model directory
and the same encoded records (dstk's encoding: prompt tokens masked, EOS appended); it pads each
micro-batch to its longest record, as its collators do. Real (non-padding) tokens are counted as
the model sees them (a forward pre-hook); timing and counting start after the warm-up steps.
Rank 0 writes its figures to --result.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def run(model: Path, train: str, fields: dict, seq_len: int, ds_config: Path, out: Path, steps: int,
        warmup_steps: int, save: bool = True, nproc: int = 2, compile: bool = False) -> dict:
    """Launch this worker on ``nproc`` ranks under the deepspeed launcher; return rank 0's figures.

    The benchmarks' one way to run the Trainer side: records of ``train`` encoded as dstk does,
    ``ds_config`` as dstk resolved it, the model saved to ``out`` unless ``save`` is off, compiled
    by the Trainer's own ``torch_compile`` when ``compile`` is on.
    """
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    spec, result = out.with_suffix(".spec.json"), out.with_suffix(".result.json")
    spec.write_text(json.dumps({"train": str(train), "fields": fields, "seq_len": seq_len, "seed": 0}))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), __file__,
               "--model", str(model), "--data", str(spec), "--ds-config", str(ds_config), "--out", str(out),
               "--result", str(result), "--steps", str(steps), "--warmup-steps", str(warmup_steps),
               *([] if save else ["--no-save"]), *(["--compile"] if compile else [])]
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"HF Trainer run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--model", "--data", "--ds-config", "--out", "--result"):
        parser.add_argument(name, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--no-save", action="store_true", help="skip saving the model (memory runs)")
    parser.add_argument("--compile", action="store_true", help="the Trainer's torch_compile=True")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    import datasets
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from toolkit.recipe import DataConfig
    from toolkit.data.formats import encode

    config = json.loads(open(args.ds_config).read())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = json.loads(open(args.data).read())
    fields = DataConfig(**data["fields"])
    records = datasets.load_dataset("json", data_files=data["train"], split="train")
    encoded = records.map(lambda r: encode(r, tokenizer, fields, data["seq_len"]), remove_columns=records.column_names)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    class Clock(TrainerCallback):
        start, tokens = None, 0

        def on_step_begin(self, training_args, state, control, **kwargs):
            if state.global_step == args.warmup_steps and self.start is None:
                self.start = time.perf_counter()

        def on_train_end(self, training_args, state, control, **kwargs):
            self.elapsed = time.perf_counter() - self.start

    opt, sched = config["optimizer"]["params"], config["scheduler"]["params"]
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=config["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"], learning_rate=opt["lr"],
        weight_decay=opt["weight_decay"], adam_beta1=opt["betas"][0], adam_beta2=opt["betas"][1],
        adam_epsilon=opt["eps"], max_grad_norm=config["gradient_clipping"], warmup_steps=sched["warmup_num_steps"],
        bf16=config.get("bf16", {}).get("enabled", False), deepspeed=config, logging_steps=1, save_strategy="no",
        report_to=[], seed=data["seed"], disable_tqdm=True, dataloader_drop_last=True, torch_compile=args.compile,
        # without CUDA, accelerate sees a DeepSpeed launch as one process unless told it is on CPU
        # (then it joins the launcher's gloo group as MULTI_CPU and the Trainer still runs DeepSpeed)
        use_cpu=not torch.cuda.is_available(),
    )
    clock = Clock()

    def count(module, positional, kwargs):
        if clock.start is not None and module.training:
            clock.tokens += int(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    trainer = Trainer(model=model, args=training, train_dataset=encoded, data_collator=collate, callbacks=[clock])
    if not trainer.is_deepspeed_enabled or training.world_size != torch.distributed.get_world_size():
        raise SystemExit("the Trainer is not running DeepSpeed on every rank: the comparison would be unfair")
    trainer.train()
    # every rank counted its own micro-batches; the step's real tokens are their sum
    mine = torch.tensor([clock.tokens], dtype=torch.float64, device=training.device)  # NCCL reduces GPU tensors
    torch.distributed.all_reduce(mine)
    from toolkit.training.metrics import model_state_mb, peak_rss_mb_per_rank, per_rank

    # measured as dstk measures its own: the engine's model states, and the peak resident memory
    memory = {"model_state_mb_per_rank": per_rank(model_state_mb(trainer.model_wrapped)),
              "peak_rss_mb_per_rank": peak_rss_mb_per_rank()}
    if not args.no_save:
        trainer.save_model(args.out)  # the whole model, for the shared evaluation
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.out)
        with open(args.result, "w") as out:
            json.dump({"tokens": mine.item(), "elapsed_s": clock.elapsed,
                       "timed_steps": args.steps - args.warmup_steps, **memory}, out)


if __name__ == "__main__":
    main()
