"""The split: which layers and how many parameters each stage gets, computed without building."""

from __future__ import annotations

import pytest

from tests.toolkit.pipeline.tiny import tiny_config
from toolkit.errors import UserError
from toolkit.models.pipeline import plan_split


def test_parameters_split_balances_parameter_counts():
    split = plan_split(tiny_config("llama", False), 2)
    counts = [split.stage_params(s) for s in range(2)]
    assert sum(counts) == split.total_params()
    assert max(counts) / split.total_params() < 0.55


def test_tied_embedding_is_counted_on_both_stages_but_once_in_the_total():
    split = plan_split(tiny_config("llama", True), 2)
    embedding = split.params[0]
    assert split.names[0].startswith("embedding") and split.names[-1].startswith("tied_head")
    assert split.stage_params(0) + split.stage_params(1) == split.total_params() + embedding
    assert plan_split(tiny_config("llama", True), 1).total_params() == split.total_params()


def test_uniform_split_balances_layer_counts():
    split = plan_split(tiny_config("gpt2", True), 4, "uniform")  # 8 layers
    assert split.parts == (0, 2, 4, 6, 8)


def test_type_regex_balances_the_matching_layers():
    split = plan_split(tiny_config("opt", True), 4, "type:decoder_layer")
    for stage in range(4):
        assert sum("decoder_layer" in split.names[i] for i in split.stage_layers(stage)) == 1


def test_summary_lists_every_stage_with_layers_and_parameters():
    split = plan_split(tiny_config("llama", False), 2)
    lines = str(split).splitlines()
    assert len(lines) == 3
    assert f"{split.stage_params(1):,} params" in lines[2] and "head(Linear)" in lines[2]
    assert split.to_dict()["stages"][0]["layers"] == [0, split.parts[1] - 1]


@pytest.mark.parametrize("stages,method,message", [
    (2, "balanced", "unknown pipeline partition method"),
    (2, "type:attention", "matches no layer"),
    (2, "type:(", "invalid pipeline partition regex"),
    (8, "parameters", "cannot split 7 pipeline layers into 8 stages"),
])
def test_impossible_split_is_a_user_error(stages, method, message):
    with pytest.raises(UserError, match=message):
        plan_split(tiny_config("llama", False), stages, method)
