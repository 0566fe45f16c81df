"""Worker for test_host_memory.py: DeepSpeed ZeRO-2 in bf16, gradients accumulated in fp32 over 2
micro-batches, trained twice from the same weights on the same batches: once as DeepSpeed comes,
once with its gradient buffers kept across steps. Writes whether the trained weights are the same
bit for bit, and whether the kept run's buffers were the same tensors at every step."""

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from tests.multirank import write_result
from toolkit.models.presets import preset_config
from toolkit.training.host_memory import keep_zero_buffers

deepspeed.init_distributed(dist_backend="gloo", verbose=False)
CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 1000,
          "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
          "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                "reduce_bucket_size": 20000, "reduce_scatter": False}}


def train(keep: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("tiny-llama"))
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=CONFIG)
    kept = keep_zero_buffers(engine.optimizer) if keep else None
    data = torch.Generator().manual_seed(1 + engine.global_rank)
    buffers = set()
    for _ in range(3 * CONFIG["gradient_accumulation_steps"]):
        ids = torch.randint(5, 90, (2, 24), generator=data)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        buffers.add(tuple(b.data_ptr() for bucket in engine.optimizer.ipg_buckets.values() for b in bucket.buffer))
        buffers.add(engine.optimizer.averaged_gradients[0].flat_partition.data_ptr())
        engine.step()
    weights = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    return weights, kept, len(buffers), not torch.allclose(weights, initial.bfloat16().float())


fresh, _, _, _ = train(keep=False)
mine, kept, distinct, moved = train(keep=True)
write_result({"kept": kept, "same_weights": torch.equal(fresh, mine), "moved": moved, "distinct_buffers": distinct})
