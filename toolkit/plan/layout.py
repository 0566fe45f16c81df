"""The parallel layout of a run, checked against the model before any worker starts.

The recipe alone can say that 3 ranks do not split into 2 pipeline stages; only the model's
config can say that 8-way tensor parallelism does not fit 4 attention heads, or which layers each
pipeline stage will hold. This module answers both and describes the layout for run.json.
"""

from __future__ import annotations

from toolkit.errors import UserError
from toolkit.models.loading import empty_model
from toolkit.models.lora import empty_adapted
from toolkit.models.packed_attention import check_packable
from toolkit.models.pipeline import plan_split
from toolkit.models.presets import preset_config
from toolkit.recipe import Recipe


def model_config(recipe: Recipe, source):
    """The transformers config of the recipe's model, loaded without its weights."""
    if source.kind == "preset":
        return preset_config(source.name)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.name, trust_remote_code=recipe.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not read the config of model {source.name!r}: {str(err).splitlines()[0]}",
                        "pass a directory saved with save_pretrained or a reachable hub id") from None


def describe(recipe: Recipe, config) -> dict:
    """Check the layout against ``config``; return its description for run.json.

    Raises:
        UserError: tensor parallelism wider than the attention heads allow, a model the
            pipeline converter does not support or cannot split into that many stages, packing
            for a model whose attention cannot take it, or LoRA target modules the model does
            not have.
    """
    p, t = recipe.parallel, recipe.train
    layout = {"nproc": p.nproc, "data_parallel": recipe.data_parallel,
              "pipeline_stages": p.pipeline_stages, "tensor_parallel": p.tensor_parallel,
              "zero_stage": p.zero_stage, "offload": p.offload, "nodes": p.nodes,
              "node_local_storage": p.node_local_storage,
              "network": {"master_addr": p.master_addr, "master_port": p.master_port, "hostfile": p.hostfile,
                          "launcher": p.launcher if p.hostfile else ("per-node" if p.nodes > 1 else "local"),
                          "network_interface": p.network_interface, "comm_timeout_s": p.comm_timeout_s}}
    if p.tensor_parallel > 1:
        heads = getattr(config, "num_attention_heads", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if heads is None or heads % p.tensor_parallel or kv_heads % p.tensor_parallel:
            raise UserError(f"parallel.tensor_parallel={p.tensor_parallel} does not divide the model's "
                            f"{heads} attention heads and {kv_heads} key-value heads",
                            "choose a tensor_parallel that divides both")
        if getattr(config, "tie_word_embeddings", False):
            # AutoTP then splits the LM head over the vocabulary and each rank sees half the
            # logits; a loss over them would be wrong, and dstk does not gather them yet
            raise UserError("parallel.tensor_parallel > 1 is not supported for models with tied input/output "
                            "embeddings (DeepSpeed AutoTP shards their LM head over the vocabulary)",
                            "use ZeRO or parallel.pipeline_stages for this model")
    model = empty_model(config, recipe.trust_remote_code)  # built once for the checks and counts below
    if t.packing:
        check_packable(model)
    layout["parameters"] = parameter_counts(recipe, model)
    if p.pipeline_stages > 1:
        split = plan_split(config, p.pipeline_stages, p.pipeline_partition)
        micro = t.grad_accum
        layout["pipeline"] = {
            "split": split.to_dict(), "partition": p.pipeline_partition, "micro_batches": micro,
            # share of each step the stages sit idle while the pipeline fills and drains
            "bubble_fraction": (p.pipeline_stages - 1) / (micro + p.pipeline_stages - 1),
            "summary": str(split),
        }
    return layout


def parameter_counts(recipe: Recipe, model) -> dict[str, int]:
    """Total and trained parameters of the whole model, counted on its empty (meta-device) copy
    ``model``, which gets the recipe's LoRA adapters in place.

    Raises:
        UserError: LoRA target modules the model does not have.
    """
    if not recipe.lora.enabled:
        total = sum(p.numel() for p in model.parameters())
        return {"total": total, "trainable": total}
    params = list(empty_adapted(model, recipe.lora).parameters())
    # the model's own parameters are frozen, only the adapters train
    return {"total": sum(p.numel() for p in params if not p.requires_grad),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}
