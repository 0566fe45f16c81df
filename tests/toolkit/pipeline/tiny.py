"""Tiny fp32 models of every supported family, and batches for them, shared by the pipeline tests.

Dropout is off everywhere so that two ways of computing the same function give the same numbers.
Sizes make the four decoder layers outweigh the embedding, so a 2-stage split can balance; Mistral's
sliding window (8) is shorter than the sequences (16), so its sliding mask is exercised.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB, SEQ, MICRO = 96, 16, 2
_SHAPE = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
              vocab_size=VOCAB, max_position_embeddings=64)

# model_type -> config keys beyond the defaults
CONFIGS: dict[str, dict] = {
    "llama": dict(_SHAPE, num_key_value_heads=2),
    "mistral": dict(_SHAPE, num_key_value_heads=2, sliding_window=8),
    "qwen2": dict(_SHAPE, num_key_value_heads=2),
    "gemma": dict(_SHAPE, num_key_value_heads=1, head_dim=16),
    "phi": dict(_SHAPE, resid_pdrop=0.0, embd_pdrop=0.0),
    "gpt_neox": dict(_SHAPE),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "opt": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=128, vocab_size=VOCAB,
                max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0),
}


def tiny_config(model_type: str, tie: bool):
    return AutoConfig.for_model(model_type, tie_word_embeddings=tie, **CONFIGS[model_type])


def tiny_model(model_type: str, tie: bool, seed: int = 0):
    """A randomly initialised model; the same ``seed`` gives the same weights in every process."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, tie), dtype=torch.float32)


def micro_batches(count: int, seed: int) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``count`` pipeline micro-batches ``((input_ids, attention_mask), labels)``, right-padded.

    Row 1 of each has padding (mask 0, label -100) from a random position on, so padding masks
    and ignored labels are part of every comparison.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (MICRO, SEQ), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, int(torch.randint(SEQ // 2, SEQ, (1,), generator=generator)):] = 0
        batches.append(((ids, mask), ids.masked_fill(mask == 0, -100)))
    return batches
