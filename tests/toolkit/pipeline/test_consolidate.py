"""Pipeline checkpoint -> HF model, in one process (the 2-rank test consolidates a real split)."""

from __future__ import annotations

import copy

import deepspeed
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.toolkit.pipeline.tiny import tiny_config, tiny_model
from toolkit.errors import UserError
from toolkit.models.pipeline import consolidate, to_pipeline


def _save_pipeline_checkpoint(model, folder):
    engine, *_ = deepspeed.initialize(
        model=to_pipeline(model, 1), config={"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9},
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    )
    engine.save_checkpoint(folder, tag="step3")


@pytest.mark.parametrize("family,tie", [("gemma", True), ("opt", True), ("phi", False)])
def test_consolidated_checkpoint_reloads_as_the_same_model(one_rank_world, tmp_path, family, tie):
    model = tiny_model(family, tie)
    _save_pipeline_checkpoint(copy.deepcopy(model), tmp_path / "checkpoints")
    consolidate(tmp_path / "checkpoints", model.config, tmp_path / "final")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert (final.get_output_embeddings().weight is final.get_input_embeddings().weight) == tie
    reloaded = final.state_dict()
    assert reloaded.keys() == model.state_dict().keys()
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())


def test_consolidating_with_another_config_is_a_user_error(one_rank_world, tmp_path):
    _save_pipeline_checkpoint(tiny_model("llama", False), tmp_path)
    with pytest.raises(UserError, match="does not match the model config"):
        consolidate(tmp_path, tiny_config("gpt_neox", False))


def test_folder_without_a_pipeline_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no pipeline checkpoint"):
        consolidate(tmp_path, tiny_config("llama", False))
