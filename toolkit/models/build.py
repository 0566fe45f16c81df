"""The module DeepSpeed trains for a recipe: the HF model (quantized, packed, with adapters as the
recipe says) or its pipeline conversion."""

from __future__ import annotations

from typing import Any

import torch

from toolkit.loss import pipeline_loss
from toolkit.models import lora
from toolkit.models.loading import DTYPES, load_for_training
from toolkit.models.packed_attention import use_packed_attention
from toolkit.models.pipeline import to_pipeline


def build_model(recipe, path: str, ds_config: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """The module DeepSpeed will train for ``recipe``: the HF model, or its pipeline conversion.

    A pipeline rank builds only its own stage's layers, reading their weights from ``path``.
    """
    p = recipe.parallel
    if p.pipeline_stages == 1:
        quantization = None
        if recipe.lora.enabled:
            quantization = lora.quantization_config(recipe.lora, DTYPES[recipe.train.precision])
        model, handle = load_for_training(path, ds_config, recipe.train.precision, recipe.trust_remote_code,
                                          quantization=quantization,
                                          attention=compiled_attention(recipe.train.compile))
        if quantization is not None:
            lora.keep_standard_4bit_layout(model)
        if recipe.train.packing:
            use_packed_attention(model)
        if recipe.lora.enabled:
            model = lora.add_adapters(model, recipe.lora, lora.base_reference(path), recipe.train.seed)
        return model, handle
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.trust_remote_code)
    module = to_pipeline(config, p.pipeline_stages, weights=path, partition=p.pipeline_partition,
                         activation_checkpoint_interval=p.activation_checkpoint_interval,
                         loss_fn=pipeline_loss, dtype=DTYPES[recipe.train.precision], seed=recipe.train.seed)
    if recipe.lora.enabled:
        module = lora.adapt_pipeline(module, recipe.lora, lora.base_reference(path), recipe.train.seed)
    return module, None


def compiled_attention(compile: bool) -> str | None:
    """The attention implementation to train with: None keeps the model's own (sdpa for most).

    Compiled on a CPU, eager attention is faster: inductor fuses its softmax and mask into the
    surrounding code, while sdpa stays an opaque CPU kernel.
    """
    return "eager" if compile and not torch.cuda.is_available() else None
