"""Layouts checked against the model's config before any worker starts."""

import pytest

from toolkit.errors import UserError
from toolkit.models.loading import resolve_model
from toolkit.plan import layout
from toolkit.recipe import load_recipe


def _describe(*overrides):
    recipe = load_recipe("tiny", list(overrides))
    return layout.describe(recipe, layout.model_config(recipe, resolve_model(recipe.model)))


def test_pipeline_split_and_bubble_are_described():
    described = _describe("parallel.pipeline_stages=2", "parallel.zero_stage=1", "train.grad_accum=4")
    pipe = described["pipeline"]
    stages = pipe["split"]["stages"]
    assert len(stages) == 2
    assert pipe["bubble_fraction"] == pytest.approx(1 / 5)  # (p-1)/(m+p-1), p=2, m=4
    assert described["data_parallel"] == 1
    assert "stage 0" in pipe["summary"] and "stage 1" in pipe["summary"]


def test_tensor_parallel_wider_than_the_heads_is_refused():
    with pytest.raises(UserError, match="does not divide the model's 4 attention heads"):
        _describe("parallel.nproc=8", "parallel.tensor_parallel=8", "parallel.zero_stage=1")


def test_tensor_parallel_must_divide_key_value_heads():
    # tiny-mistral has 4 attention heads but 2 key-value heads
    with pytest.raises(UserError, match="2 key-value heads"):
        _describe("model=tiny-mistral", "parallel.nproc=4", "parallel.tensor_parallel=4", "parallel.zero_stage=1")


def test_tensor_parallel_with_tied_embeddings_is_refused():
    with pytest.raises(UserError, match="tied input/output embeddings"):
        _describe("model=tiny-qwen2", "parallel.tensor_parallel=2", "parallel.zero_stage=1")


def test_lora_target_modules_the_model_lacks_are_refused():
    with pytest.raises(UserError, match=r"lora.target_modules: Target modules \{'c_attn'\} not found"):
        _describe("lora.enabled=true", "lora.target_modules=[c_attn]")  # GPT-2's name, not LLaMA's
    _describe("lora.enabled=true", "lora.target_modules=all-linear")
    _describe("model=tiny-gpt2", "lora.enabled=true")  # peft's per-family default: c_attn


def test_a_model_that_is_not_a_causal_lm_is_refused_before_workers(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16).save_pretrained(tmp_path)  # encoder-decoder
    with pytest.raises(UserError, match="model_type 't5' has no causal-LM class"):
        _describe(f"model={tmp_path}")
