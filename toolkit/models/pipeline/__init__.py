"""HF causal LM <-> DeepSpeed pipeline: conversion, partitioning, and consolidation back.

Build (every rank, after ``deepspeed.init_distributed()``)::

    module = to_pipeline(config, num_stages, weights=model_dir)    # or to_pipeline(model, ...)
    engine, *_ = deepspeed.initialize(model=module, config=ds_config, model_parameters=...)
    loss = engine.train_batch(iter(batches))   # items: ((input_ids, attention_mask), labels)

Describe the split before launching: ``print(plan_split(config, num_stages))``. Back to HF after
``engine.save_checkpoint(ckpt_dir)``: ``consolidate(ckpt_dir, config, "final")``.

Supported families: LLaMA, Mistral, Qwen2, Gemma, Phi, GPT-NeoX, GPT-2, OPT
(:func:`supported_model_types`).
"""

from toolkit.models.pipeline.consolidate import consolidate, consolidate_adapter
from toolkit.models.pipeline.convert import HFPipelineModule, plan_split, to_pipeline
from toolkit.models.pipeline.families import supported_model_types
from toolkit.models.pipeline.partition import Split

__all__ = [
    "HFPipelineModule",
    "Split",
    "consolidate",
    "consolidate_adapter",
    "plan_split",
    "supported_model_types",
    "to_pipeline",
]
