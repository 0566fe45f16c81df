"""`dstk init`: a starter recipe with the data's fields, a layout for the machine, and its reasons."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_dstk
from toolkit.errors import UserError
from toolkit.models.presets import build_preset
from toolkit.plan.starter import Machine, data_fields, layout, starter
from toolkit.recipe import load_recipe

CPU = Machine(gpus=0, gpu_memory=0, bf16=False, cores=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_preset("tiny-llama", tmp_path_factory.mktemp("model") / "llama", seed=0)


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_starter_recipe_has_the_data_fields_and_a_layout_for_the_machine(model, tmp_path):
    data = _write(tmp_path / "train.jsonl", [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(100)])
    text, choices = starter(str(model), str(data), None, None, "mine", CPU)
    recipe_file = tmp_path / "mine.yaml"
    recipe_file.write_text(text)
    recipe = load_recipe(recipe_file)
    assert (recipe.data.format, recipe.data.prompt_field, recipe.data.response_field) == ("instruction", "question", "answer")
    assert (recipe.parallel.nproc, recipe.parallel.zero_stage, recipe.train.precision) == (2, 2, "fp32")
    assert recipe.train.seq_len == 256  # the tiny model's context, under the template's 1024
    assert recipe.train.max_steps == max(10, math.ceil(100 / (4 * 4 * 2)))
    assert recipe.name == "mine" and recipe.output_dir == "runs/mine" and recipe.data.eval is None
    assert "  prompt_field: question      # what the model reads" in text  # each filled-in line says why
    assert {c.key for c in choices} >= {"model", "data.format", "parallel.nproc", "train.precision"}


def test_chat_records_start_from_the_chat_recipe_and_other_fields_are_refused(model, tmp_path):
    chat = _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello"}]}] * 12)
    text, _ = starter(str(model), str(chat), None, None, "talk", CPU)
    assert "format: chat" in text and "messages_field: messages" in text and "prompt_field" not in text
    with pytest.raises(UserError, match=r"cannot tell the data's format from its fields \(id, body\)"):
        data_fields(["id", "body"], None)


def test_the_layout_follows_the_model_and_the_gpus():
    h100s = Machine(gpus=8, gpu_memory=80 * 2**30, bf16=True, cores=64)
    small, large = layout(7 * 10**9, False, h100s), layout(70 * 10**9, False, h100s)
    assert [c.value for c in small] == [8, 2, "bf16"]  # 7B: 26 GiB of states per rank with ZeRO-2 fits
    assert [c.value for c in large] == [8, 3, "bf16"]  # 70B does not: ZeRO-3
    assert layout(70 * 10**9, True, h100s)[1].value == 3  # frozen 140 GB of bf16 weights: still ZeRO-3
    assert layout(7 * 10**9, False, Machine(gpus=2, gpu_memory=16 * 2**30, bf16=False, cores=8))[2].value == "fp32"


def test_the_command_writes_once_and_says_how_to_run(model, tmp_path):
    data = _write(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)])
    done = run_dstk("init", "--model", model, "--data", data, "-o", tmp_path / "r.yaml", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"run it: dstk train {tmp_path / 'r.yaml'}" in done.stdout and load_recipe(tmp_path / "r.yaml").data.train
    again = run_dstk("init", "--model", model, "--data", data, "-o", tmp_path / "r.yaml", cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "r.yaml already exists" in again.stderr
