"""Worker: fine-tune the same recipe under several ZeRO stages in one launch.

Usage: finetune_layouts.py OUT STAGES [key=value ...]; STAGES like "0,1,2,3". Writes, per stage,
the logged losses and, with --probe, the largest relative difference between the trained engine's
logits and those of its consolidated final/ reloaded by from_pretrained.
"""

import argparse
import gc

import deepspeed
import torch
import torch.distributed as dist

from tests.multirank import write_result
from toolkit import finetune

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("stages")
parser.add_argument("--probe", action="store_true")
parser.add_argument("--local_rank", type=int)  # passed by the launcher
args, overrides = parser.parse_known_args()

deepspeed.init_distributed(verbose=False)
results = {}
for stage in map(int, args.stages.split(",")):
    result = finetune(None, [f"output_dir={args.out}/zero{stage}", f"parallel.zero_stage={stage}",
                             f"parallel.nproc={dist.get_world_size()}", *overrides])
    entry = {"losses": result.losses, "zero_partitioned": None}
    module = result.engine.module
    params = list(module.parameters())
    # under ZeRO-3 each rank holds only its shard: ds_tensor is the local partition
    entry["zero_partitioned"] = all(hasattr(p, "ds_tensor") for p in params)
    entry["local_numel"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    entry["full_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    if args.probe:
        probe = (torch.arange(24).view(2, 12) * 7 % 90 + 5).to(result.engine.device)
        result.engine.eval()
        with torch.no_grad():
            trained = module(input_ids=probe).logits.float().cpu()
        if dist.get_rank() == 0:
            from transformers import AutoModelForCausalLM

            gc.collect()  # drop the ZeRO-3 HfDeepSpeedConfig so from_pretrained loads plainly
            reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir, dtype=torch.float32)
            with torch.no_grad():
                again = reloaded(input_ids=probe.cpu()).logits.float()
            entry["final_rel_diff"] = ((again - trained).abs().max() / trained.abs().max()).item()
            entry["tied"] = reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    results[stage] = entry
    del result, module, params
    gc.collect()
write_result(results)

