"""Recipes: every shipped recipe and DeepSpeed template validates; bad values get clear errors."""

import json
import re

import pytest

from tests.conftest import ROOT
from toolkit.errors import UserError
from toolkit.plan import ds_config
from toolkit.recipe import builtin_recipes, load_recipe


@pytest.mark.parametrize("name", builtin_recipes())
def test_shipped_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.name == name


@pytest.mark.parametrize("stage,offload,extra", [
    (0, "none", []), (1, "none", []), (2, "none", []), (3, "none", []), (2, "cpu", []), (3, "cpu", []),
    (1, "none", ["parallel.pipeline_stages=2"]), (1, "none", ["parallel.tensor_parallel=2"]),
])
def test_every_template_fills_from_recipe(stage, offload, extra):
    recipe = load_recipe("tiny", [f"parallel.zero_stage={stage}", f"parallel.offload={offload}",
                                  "train.micro_batch_size=3", "train.grad_accum=5", "train.lr=0.01", *extra])
    config = ds_config.build(recipe)
    assert ds_config.template_name(recipe) in ds_config.template_names()
    assert '"auto"' not in json.dumps(config)
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_batch_size"] == 3 * 5 * recipe.parallel.nproc // recipe.parallel.pipeline_stages
    assert config["optimizer"]["params"]["lr"] == 0.01


def test_training_uses_torchs_fused_adamw_unless_the_config_chooses(tmp_path):
    config = ds_config.build(load_recipe("tiny"))
    assert config["optimizer"]["params"]["torch_adam"] is True and config["optimizer"]["params"]["fused"] is True
    mine = json.loads((ROOT / "ds_configs" / "zero1.json").read_text())
    mine["optimizer"]["params"]["torch_adam"] = False
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(mine))
    chosen = ds_config.build(load_recipe("tiny", [f"parallel.ds_config={path}"]))["optimizer"]["params"]
    assert chosen["torch_adam"] is False and "fused" not in chosen


def test_zero3_buckets_follow_the_hidden_size():
    config = ds_config.build(load_recipe("tiny", ["parallel.zero_stage=3"]), hidden_size=4096)
    assert config["zero_optimization"]["reduce_bucket_size"] == 4096**2
    assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 4096**2)
    # a tiny model would otherwise reduce its gradients a few thousand at a time
    assert ds_config.build(load_recipe("tiny", ["parallel.zero_stage=3"]), hidden_size=64)[
        "zero_optimization"]["reduce_bucket_size"] == 2**20


def test_zero3_steps_its_optimizer_in_bounded_sub_groups():
    # DeepSpeed's own 1e9 would copy a whole rank's gradients to fp32 at every step
    for offload in ("none", "cpu"):
        config = ds_config.build(load_recipe("tiny", ["parallel.zero_stage=3", f"parallel.offload={offload}"]))
        assert config["zero_optimization"]["sub_group_size"] == ds_config.ZERO3_SUB_GROUP == 2**24


def test_every_template_is_shipped():
    assert set(ds_config.template_names()) == {"zero0", "zero1", "zero2", "zero3", "zero2_offload",
                                               "zero3_offload", "pipeline", "autotp"}


def test_overrides_are_typed_by_yaml():
    recipe = load_recipe("tiny", ["train.max_steps=7", "train.lr=1e-4", "data.eval=null",
                                  "train.precision=bf16"])
    assert recipe.train.max_steps == 7 and recipe.train.lr == 1e-4
    assert recipe.data.eval is None and recipe.train.precision == "bf16"


def test_default_output_dir_follows_the_recipe_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  max_steps: 3\n")
    assert load_recipe(path).output_dir == "runs/mine"


@pytest.mark.parametrize("override,message", [
    ("train.max_step=3", "unknown key `train.max_step` (did you mean `train.max_steps`?)"),
    ("paralel.zero_stage=3", "unknown key `paralel` (did you mean `parallel`?)"),
    ("parallel.zero_stage=5", "`parallel.zero_stage`: Input should be less than or equal to 3"),
    ("train.micro_batch_size=0", "`train.micro_batch_size`: Input should be greater than or equal to 1"),
    ("train.precision=fp16", "`train.precision`: Input should be 'fp32' or 'bf16'"),
    ("parallel.offload=cpu", "parallel.offload=cpu needs parallel.zero_stage 2 or 3"),
    ("train.warmup_ratio=1.5", "`train.warmup_ratio`: Input should be less than 1"),
    ("audit.enforc=false", "unknown key `audit.enforc` (did you mean `audit.enforce`?)"),
    ("train.max_steps", "is not of the form key=value"),
    ("parallel.pipeline_stages=3", "parallel.nproc (2) must be a multiple of parallel.pipeline_stages"),
    ("parallel.pipeline_partition=type:[", "parallel.pipeline_partition regex is invalid"),
    ("parallel.pipeline_partition=layers", "must be parameters, uniform or type:REGEX"),
    ("--local_rank=0", "is not of the form key=value"),
    ("lora.r=0", "`lora.r`: Input should be greater than or equal to 1"),
    ("lora.quantize_base=nf3", "`lora.quantize_base`: Input should be 'none', 'nf4' or 'int8'"),
    ("lora.dropout=1", "`lora.dropout`: Input should be less than 1"),
    ("lora.merg=true", "unknown key `lora.merg` (did you mean `lora.merge`?)"),
])
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(UserError) as err:
        load_recipe("tiny", ["parallel.zero_stage=1", override] if "offload" in override else [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.pipeline_stages=2", "parallel.zero_stage=2"], "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only"),
    (["parallel.pipeline_stages=2", "parallel.zero_stage=3"], "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only"),
    (["parallel.nproc=4", "parallel.pipeline_stages=2", "parallel.tensor_parallel=2", "parallel.zero_stage=1"],
     "AutoTP training does not run inside its pipeline engine"),
    (["parallel.tensor_parallel=2", "parallel.zero_stage=3"], "does not combine with ZeRO-3"),
    (["parallel.tensor_parallel=4"], "parallel.nproc (2) must be a multiple"),
    (["lora.enabled=true", "parallel.tensor_parallel=2"], "AutoTP would split the adapters' own layers"),
    (["lora.enabled=true", "lora.quantize_base=nf4", "parallel.pipeline_stages=2"],
     "lora.quantize_base with pipeline_stages > 1 is not available"),
    (["lora.enabled=true", "lora.quantize_base=nf4", "parallel.zero_stage=3", "parallel.offload=cpu"],
     "lora.quantize_base with parallel.offload=cpu is not available"),
    # a lora block that forgot enabled=true would otherwise train every weight without a word
    (["lora.r=4"], "lora.* is set but lora.enabled is false"),
])
def test_impossible_layouts_are_refused(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe("tiny", overrides)


def test_all_problems_are_reported_at_once():
    with pytest.raises(UserError) as err:
        load_recipe("tiny", ["train.max_step=3", "parallel.zero_stage=9"])
    assert "train.max_step" in str(err.value) and "parallel.zero_stage" in str(err.value)


def test_unknown_recipe_name_suggests_builtin():
    with pytest.raises(UserError, match="did you mean `tiny`"):
        load_recipe("tinny")


def test_missing_recipe_file():
    with pytest.raises(UserError, match="recipe file nowhere.yaml does not exist"):
        load_recipe("nowhere.yaml")


def test_misspelt_deepspeed_key_is_refused(tmp_path):
    config = {"zero_optimisation": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="did you mean `zero_optimization`"):
        ds_config.build(load_recipe("tiny", [f"parallel.ds_config={path}"]))


def test_readme_documents_every_recipe_key():

    from toolkit.recipe import schema_markdown

    readme = (ROOT / "README.md").read_text()
    for row in schema_markdown().splitlines()[2:]:
        assert row.split("|")[1].strip() in readme, row
