"""Worker: fine-tune the same recipe under several parallel layouts in one launch.

Usage: finetune_layouts.py OUT --layout NAME=key=value,key=value ... [-- key=value ...]
Writes, per layout, the logged losses and communication shares, whether it ran compiled, with
which attention and in which dtype it accumulated gradients, how much of the model this rank
holds, and on rank 0 the logits of its consolidated final/ (reloaded by from_pretrained; a LoRA
adapter onto its base) on a fixed probe;
for layouts driven module by module, also the largest relative difference to the trained
engine's logits.
"""

import argparse
import gc
import json

import deepspeed
import torch
import torch.distributed as dist

from tests.multirank import write_result
from toolkit import finetune

PROBE = torch.arange(24).view(2, 12) * 7 % 90 + 5  # token ids inside the tiny vocabulary

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--layout", action="append", default=[], help="NAME=override,override")
parser.add_argument("--resume", action="append", default=[],
                    help="LAYOUT:STEP: rerun LAYOUT from its checkpoint of STEP with resume=auto")
parser.add_argument("--local_rank", type=int)  # passed by the launcher
args, common = parser.parse_known_args()


def final_logits(folder):
    from transformers import AutoModelForCausalLM

    gc.collect()  # drop a ZeRO-3 HfDeepSpeedConfig so from_pretrained loads plainly
    if (folder / "adapter_config.json").is_file():
        from toolkit.models.lora import reload
        from toolkit.recipe import load_recipe

        model = reload(folder, load_recipe(folder.parent / "recipe.yaml").lora)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float(), model


def rerun_from(name: str, step: int) -> list[float]:
    """Roll a finished run back to its checkpoint of ``step`` and let resume=auto finish it again."""
    import shutil
    from pathlib import Path

    overrides = dict(spec.partition("=")[::2] for spec in args.layout)[name]
    run = Path(args.out) / name
    again = Path(args.out) / f"{name}_resumed"
    if dist.get_rank() == 0:
        shutil.copytree(run, again, ignore=shutil.ignore_patterns("final"))
        for folder in (again / "checkpoints").glob("step_*"):
            if int(folder.name.removeprefix("step_")) > step:
                shutil.rmtree(folder)
        (again / "checkpoints" / "latest").write_text(f"step_{step:06d}")
    dist.barrier()
    result = finetune(None, [f"output_dir={again}", f"parallel.nproc={dist.get_world_size()}", "resume=auto",
                             *common, *filter(None, overrides.split(","))])
    return result.losses


deepspeed.init_distributed(verbose=False)
# resumed right after their first run: DeepSpeed's process-wide parallel groups are those of the
# latest engine, and a later pipeline's would not fit the rerun's layout
resume_at = {name: int(step) for name, _, step in (spec.partition(":") for spec in args.resume)}
results = {}
for spec in args.layout:
    name, _, overrides = spec.partition("=")
    result = finetune(None, [f"output_dir={args.out}/{name}", f"parallel.nproc={dist.get_world_size()}",
                             *common, *filter(None, overrides.split(","))])
    logged = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    measured = json.loads((result.output_dir / "run.json").read_text())["result"]
    entry = {"losses": result.losses, "comm_shares": [line["comm_share"] for line in logged if "loss" in line],
             "compiled": result.engine.is_compiled, "grad_accum_dtype": str(result.engine.get_data_types()[1]),
             "shm_collectives": measured["shm_collectives"], "kept_zero_buffers": measured["kept_zero_buffers"]}
    config = getattr(result.engine.module, "config", None)  # a pipeline module has none
    entry["attention"] = None if config is None else config._attn_implementation
    params = list(result.engine.module.parameters())
    # ZeRO-3 keeps a rank's shard in ds_tensor; other layouts hold what parameters() shows
    entry["partitioned"] = all(hasattr(p, "ds_tensor") for p in params)
    entry["local_numel"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    pipeline = hasattr(result.engine, "train_batch") and hasattr(result.engine, "is_last_stage")
    trained = None
    if not pipeline:
        result.engine.eval()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # a compiled model, as dstk evaluates it
            trained = result.engine.module(input_ids=PROBE.to(result.engine.device)).logits.float().cpu()
    if dist.get_rank() == 0:
        logits, model = final_logits(result.final_dir)
        entry["final_logits"] = logits.tolist()
        entry["full_numel"] = sum(p.numel() for p in model.parameters())
        entry["tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        if trained is not None:
            entry["final_vs_engine"] = ((logits - trained).abs().max() / trained.abs().max()).item()
    results[name] = entry
    del result, params
    gc.collect()
    if name in resume_at:
        entry["resumed_losses"] = rerun_from(name, resume_at[name])

write_result(results)
