"""In-process checks of the conversion: every family, both ties, every weight source.

A one-stage pipeline runs all of its layers in this process, so it checks that the chain of
pipeline layers computes the HF model's function; the 2-rank test checks the split itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig

from tests.toolkit.pipeline.tiny import CONFIGS, micro_batches, tiny_config, tiny_model
from toolkit.errors import UserError
from toolkit.loss import next_token_mean
from toolkit.models.pipeline import supported_model_types, to_pipeline

# Phi ties only without an LM-head bias, which Phi always has: tested as an error below.
CASES = [(family, tie) for family in CONFIGS for tie in (False, True) if (family, tie) != ("phi", True)]


def _hf_and_pipeline(pipeline, model, batch):
    (ids, mask), labels = batch
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits = pipeline.eval()((ids, mask))
    return expected, logits, next_token_mean(logits, labels)


@pytest.mark.parametrize("family,tie", CASES)
def test_converted_model_computes_the_hf_loss_and_logits(one_rank_world, family, tie):
    model = tiny_model(family, tie).eval()
    batch = micro_batches(1, seed=1)[0]
    expected, logits, loss = _hf_and_pipeline(to_pipeline(copy.deepcopy(model), 1), model, batch)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family,tie", CASES)
def test_built_from_config_and_state_dict_matches_the_model(one_rank_world, family, tie):
    model = tiny_model(family, tie).eval()
    batch = micro_batches(1, seed=2)[0]
    pipeline = to_pipeline(tiny_config(family, tie), 1, weights=model.state_dict())
    expected, logits, _ = _hf_and_pipeline(pipeline, model, batch)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,tie", [("gemma", True), ("gpt2", True), ("opt", False)])
def test_built_from_a_saved_model_directory_matches_the_model(one_rank_world, tmp_path, family, tie):
    model = tiny_model(family, tie).eval()
    model.save_pretrained(tmp_path)
    batch = micro_batches(1, seed=3)[0]
    pipeline = to_pipeline(AutoConfig.from_pretrained(tmp_path), 1, weights=tmp_path)
    expected, logits, _ = _hf_and_pipeline(pipeline, model, batch)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-6)


def test_tied_checkpoint_holding_only_the_head_matrix_loads(one_rank_world):
    model = tiny_model("qwen2", True).eval()
    state = model.state_dict()
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    pipeline = to_pipeline(tiny_config("qwen2", True), 1, weights=state)
    expected, logits, _ = _hf_and_pipeline(pipeline, model, micro_batches(1, seed=4)[0])
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-6)


def test_checkpoint_keys_without_the_base_model_prefix_load(one_rank_world):
    """GPT-2 checkpoints on the hub name the base model's weights without ``transformer.``."""
    model = tiny_model("gpt2", True).eval()
    state = {key.removeprefix("transformer."): value for key, value in model.state_dict().items()}
    pipeline = to_pipeline(tiny_config("gpt2", True), 1, weights=state)
    expected, logits, _ = _hf_and_pipeline(pipeline, model, micro_batches(1, seed=5)[0])
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-6)


def test_random_init_from_a_config_is_the_same_on_every_build(one_rank_world):
    """Data-parallel replicas of a stage build it separately and must start identical."""
    config = tiny_config("llama", True)
    first, second = (to_pipeline(config, 1, seed=7).state_dict() for _ in range(2))
    other = to_pipeline(config, 1, seed=8).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["tied_modules.embedding.tokens.weight"], other["tied_modules.embedding.tokens.weight"])


def test_unsupported_architecture_is_a_user_error_listing_the_supported(one_rank_world):
    with pytest.raises(UserError) as err:
        to_pipeline(AutoConfig.for_model("gptj", n_embd=32, n_layer=2, n_head=2, rotary_dim=8), 1)
    assert "gptj" in err.value.message
    assert all(t in err.value.hint for t in supported_model_types())


def test_tied_head_with_its_own_bias_is_a_user_error(one_rank_world):
    with pytest.raises(UserError, match="tied LM head"):
        to_pipeline(tiny_config("phi", True), 2)


def test_missing_weight_names_the_key(one_rank_world):
    state = tiny_model("llama", False).state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.weight"):
        to_pipeline(tiny_config("llama", False), 1, weights=state)
