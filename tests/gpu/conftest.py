"""The GPU checks (marker ``gpu``): dstk's CUDA paths, which no CPU run executes.

``benchmarks/gpu_check.sh`` runs them with the throughput benchmark and writes the summary.
Without a CUDA device each test here is skipped with the reason. ``DSTK_GPU_REHEARSAL=1`` runs
them on the CPU with a small model instead of the 100M one, to check the checks themselves before
a GPU's time is spent on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
ON_GPU = torch.cuda.is_available()
REHEARSAL = os.environ.get("DSTK_GPU_REHEARSAL") == "1"
FIGURES_ENV = "DSTK_GPU_FIGURES"  # a JSON-lines file the checks' figures go to, for the summary
SKIP_REASON = "no CUDA device: the gpu checks run on a GPU host (bash benchmarks/gpu_check.sh)"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.gpu)
            if not (ON_GPU or REHEARSAL):
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def record(check: str, **figures) -> None:
    """Hand a check's figures to the summary of benchmarks/gpu_check.sh (nothing when it is not running)."""
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"check": check, **figures}) + "\n")


@pytest.fixture(scope="session")
def llama_100m(tmp_path_factory) -> Path:
    """A 113M-parameter LLaMA (width 768, 16 layers) on the built-in tokenizer, random weights in
    fp32; in a rehearsal on the CPU, 2 layers of width 128."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from toolkit.data.tokenizer import char_tokenizer

    folder = tmp_path_factory.mktemp("llama-100m")
    tokenizer = char_tokenizer()
    width, layers = (128, 2) if REHEARSAL and not ON_GPU else (768, 16)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=layers,
                                  num_attention_heads=width // 64, num_key_value_heads=width // 64,
                                  intermediate_size=width * 8 // 3 // 64 * 64, max_position_embeddings=512,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
