"""Built-in tiny presets: real HF architectures built from configs, nothing downloaded.

Each preset is a transformers ``model_type`` with small sizes. The default, ``tiny-llama``, is
LLaMA-shaped; the others cover the families the pipeline converter and the tests exercise.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from toolkit.data.tokenizer import char_tokenizer

_WIDTH, _LAYERS, _HEADS, _FFN, _POSITIONS = 128, 4, 4, 384, 256

# model_type -> the config keys that family names its sizes by
PRESETS: dict[str, dict] = {
    "tiny-llama": dict(model_type="llama", hidden_size=_WIDTH, num_hidden_layers=_LAYERS,
                       num_attention_heads=_HEADS, num_key_value_heads=_HEADS, intermediate_size=_FFN,
                       max_position_embeddings=_POSITIONS, tie_word_embeddings=False),
    "tiny-mistral": dict(model_type="mistral", hidden_size=_WIDTH, num_hidden_layers=_LAYERS,
                         num_attention_heads=_HEADS, num_key_value_heads=2, intermediate_size=_FFN,
                         max_position_embeddings=_POSITIONS, sliding_window=None),
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=_WIDTH, num_hidden_layers=_LAYERS,
                       num_attention_heads=_HEADS, num_key_value_heads=2, intermediate_size=_FFN,
                       max_position_embeddings=_POSITIONS, tie_word_embeddings=True),
    "tiny-gemma": dict(model_type="gemma", hidden_size=_WIDTH, num_hidden_layers=_LAYERS,
                       num_attention_heads=_HEADS, num_key_value_heads=1, head_dim=_WIDTH // _HEADS,
                       intermediate_size=_FFN, max_position_embeddings=_POSITIONS),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=_WIDTH, n_layer=_LAYERS, n_head=_HEADS,
                      n_positions=_POSITIONS),
    "tiny-gpt-neox": dict(model_type="gpt_neox", hidden_size=_WIDTH, num_hidden_layers=_LAYERS,
                          num_attention_heads=_HEADS, intermediate_size=_FFN,
                          max_position_embeddings=_POSITIONS),
    "tiny-opt": dict(model_type="opt", hidden_size=_WIDTH, num_hidden_layers=_LAYERS,
                     num_attention_heads=_HEADS, ffn_dim=_FFN, word_embed_proj_dim=_WIDTH,
                     max_position_embeddings=_POSITIONS),
    "tiny-phi": dict(model_type="phi", hidden_size=_WIDTH, num_hidden_layers=_LAYERS,
                     num_attention_heads=_HEADS, intermediate_size=_FFN,
                     max_position_embeddings=_POSITIONS),
}


def preset_config(name: str):
    """The transformers config of preset ``name``, sized to the built-in tokenizer."""
    tokenizer = char_tokenizer()
    settings = dict(PRESETS[name])
    return AutoConfig.for_model(
        settings.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **settings
    )


def build_preset(name: str, folder: Path, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    """Initialise preset ``name`` with ``seed`` and save it with its tokenizer to ``folder``.

    Saving first and loading from disk in every rank gives every parallel layout the same start,
    and makes a preset take the same ZeRO-3 aware path as a user's pretrained model.
    """
    tokenizer = char_tokenizer()
    config = preset_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
