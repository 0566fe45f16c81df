"""DeepSpeed configs: pick a ``ds_configs/`` template, fill its ``"auto"`` values from the recipe.

The templates are plain JSON users can read and copy. DeepSpeed silently ignores a misspelt
top-level key, so a config is checked against the keys DeepSpeed knows before any worker starts.
"""

from __future__ import annotations

import difflib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.recipe import Recipe

# Top-level keys DeepSpeed reads (deepspeed/runtime/config.py and its sub-configs).
KNOWN_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "dump_state", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "bf16", "bfloat16", "fp16", "amp", "optimizer",
    "scheduler", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "activation_checkpointing", "pipeline", "tensor_parallel", "communication_data_type",
    "seq_parallel_communication_data_type", "data_types", "flops_profiler", "tensorboard", "wandb",
    "csv_monitor", "comet", "checkpoint", "aio", "memory_breakdown", "elasticity", "compression_training",
    "data_efficiency", "curriculum_learning", "disable_allgather", "sparse_attention", "torch_autocast",
    "graph_harvesting", "use_data_before_expert_parallelism", "timers", "compile", "weight_quantization",
    "hybrid_engine", "autotuning", "nebula", "eigenvalue", "progressive_layer_drop", "quantize_training",
    "gradient_accumulation_dtype", "load_universal_checkpoint", "use_node_local_storage", "comms_logger",
})

# elements per ZeRO-3 optimizer sub-group: its step's fp32 gradient copy is 64 MiB at most (see build)
ZERO3_SUB_GROUP = 2**24


def template_name(recipe: Recipe) -> str:
    """The ``ds_configs/`` template for the recipe's layout: pipeline, AutoTP or a ZeRO stage."""
    p = recipe.parallel
    if p.pipeline_stages > 1:
        return "pipeline"
    if p.tensor_parallel > 1:
        return "autotp"
    return f"zero{p.zero_stage}" + ("_offload" if p.offload == "cpu" else "")


def template_names() -> list[str]:
    folder = resources.files("toolkit") / "ds_configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_template(recipe: Recipe) -> dict[str, Any]:
    """Read the user's ``parallel.ds_config`` file, or the built-in template for the recipe."""
    if recipe.parallel.ds_config:
        path = Path(recipe.parallel.ds_config)
        if not path.is_file():
            raise UserError(f"parallel.ds_config file {path} does not exist",
                            f"give a JSON path or leave it null to use ds_configs/{template_name(recipe)}.json")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    else:
        name = template_name(recipe)
        text = (resources.files("toolkit") / "ds_configs" / f"{name}.json").read_text(encoding="utf-8")
        origin = f"ds_configs/{name}.json"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{origin} is not valid JSON: {err}", "fix the JSON syntax at that line") from None
    check_keys(config, origin)
    return config


def check_keys(config: dict[str, Any], origin: str) -> None:
    """Refuse top-level keys DeepSpeed does not know (it would ignore them silently)."""
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
        hint = f"did you mean `{close[0]}`?" if close else "remove it; DeepSpeed would ignore it"
        raise UserError(f"{origin}: unknown DeepSpeed key `{key}`", hint)


def build(recipe: Recipe, hidden_size: int | None = None) -> dict[str, Any]:
    """The resolved DeepSpeed config for a recipe: template with every ``"auto"`` filled.

    ``hidden_size`` (the model's) sizes ZeRO-3's buckets as transformers' and accelerate's
    ``"auto"`` do: ``hidden_size²`` elements, here at least 2**20 (also when it is unknown).
    ZeRO-3 keeps its reduce bucket allocated for the whole run, so a fixed 5e7-element bucket costs
    every rank 191 MiB of fp32 whatever the model; the floor keeps tiny models from paying a
    collective per few thousand gradients.

    ZeRO-3 steps its optimizer one sub-group of the rank's partition at a time, and in bf16 or fp16
    makes an fp32 copy of that sub-group's gradients to step it: DeepSpeed's default of 1e9 elements
    is the whole partition wherever a rank holds fewer than 1e9 parameters: 4 bytes a parameter
    on top of the model states at every step. :data:`ZERO3_SUB_GROUP` elements bound that copy to
    64 MiB (the README's Parallel layouts gives the peak it saved).

    Raises:
        UserError: the template is unreadable, has unknown keys, or contradicts the recipe.
    """
    config = load_template(recipe)
    t, p = recipe.train, recipe.parallel
    values = {
        "zero_optimization.stage": p.zero_stage,
        "tensor_parallel.autotp_size": p.tensor_parallel,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed 0.19.8 checks this against every rank outside a pipeline, AutoTP ranks
        # included, though tensor-parallel ranks share their batch
        "train_batch_size": t.micro_batch_size * t.grad_accum * p.nproc // p.pipeline_stages,
        "gradient_clipping": t.grad_clip,
        # the engine logs itself; keep DeepSpeed's own step printing out of the way
        "steps_per_print": 10**9,
        "bf16.enabled": t.precision == "bf16",
        "optimizer.params.lr": t.lr,
        "optimizer.params.weight_decay": t.weight_decay,
        "scheduler.params.total_num_steps": t.max_steps,
        "scheduler.params.warmup_num_steps": recipe.warmup_steps,
        "scheduler.params.cos_min_ratio": t.min_lr_ratio,
    }
    bucket = max((hidden_size or 0) ** 2, 2**20)
    values["zero_optimization.reduce_bucket_size"] = bucket
    values["zero_optimization.stage3_prefetch_bucket_size"] = int(0.9 * bucket)
    values["zero_optimization.sub_group_size"] = ZERO3_SUB_GROUP
    _fill_auto(config, values, prefix="")
    for key, wanted in (("zero_optimization.stage", p.zero_stage),
                        ("tensor_parallel.autotp_size", p.tensor_parallel)):
        section, name = key.split(".")
        found = config.get(section, {}).get(name, 0 if name == "stage" else 1)
        if found != wanted:
            raise UserError(f"the DeepSpeed config sets {key}={found} but the recipe asks for {wanted}",
                            "make them agree, or write \"auto\" in the config")
    if p.pipeline_stages > 1 and t.precision == "bf16" and p.zero_stage == 0:
        # DeepSpeed steps a bf16 pipeline with its BF16 optimizer, which partitions the optimizer
        # state over the data-parallel ranks at stage 0 too, but checkpoints it per rank only at
        # stage 1: at 0 a resume crashed (KeyError 0 in 0.19.8), and would have lost the other ranks'
        # partitions. Stage 1 is the same optimizer, the same memory and the same maths.
        config["zero_optimization"]["stage"] = 1
    if p.node_local_storage:  # each node's local rank 0 then writes the files rank 0 alone would
        config.setdefault("checkpoint", {})["use_node_local_storage"] = True
    _prefer_torch_fused_adam(config, p.offload)
    return config


def _prefer_torch_fused_adam(config: dict[str, Any], offload: str) -> None:
    """Train with torch's fused AdamW rather than DeepSpeed's FusedAdam, on a CPU and on a GPU.

    Both make the same decoupled-weight-decay Adam update in one multi-tensor kernel on a GPU, but
    DeepSpeed's is an op it compiles at first use (nvcc on a GPU, g++ on a CPU: a minute or more,
    a compiler matching torch's CUDA, and a ``lock`` file that hangs every later job if the build
    is killed); torch's ships compiled. Offload keeps DeepSpeed's CPU Adam, which it requires; a
    config that sets ``torch_adam`` itself is left as it is.

    On a CPU torch's fused kernel (``fused``) updates in one pass where its default loop form makes
    temporaries as large as what it updates, and ZeRO hands it one flat fp32 tensor per group, the
    rank's whole partition.
    """
    optimizer = config.get("optimizer", {})
    if offload == "none" and str(optimizer.get("type", "")).lower() in ("adam", "adamw") \
            and "torch_adam" not in optimizer.get("params", {}):
        optimizer.setdefault("params", {}).update(torch_adam=True, fused=True)


def _fill_auto(node: dict[str, Any], values: dict[str, Any], prefix: str) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _fill_auto(value, values, f"{dotted}.")
        elif value == "auto":
            if dotted not in values:
                raise UserError(f"DeepSpeed config value `{dotted}` is \"auto\" but dstk has no recipe "
                                "value for it", "write a concrete value in the config")
            node[key] = values[dotted]
