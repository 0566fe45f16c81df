"""HF causal LM (instantiated, or config + weights) -> DeepSpeed ``PipelineModule``.

The model is cut into pipeline layers: token embedding, the family's embedding extras (if any),
one layer per decoder block, the final modules, the LM head. A tied LM head is a second
``TiedLayerSpec`` of the embedding layer, so the tie survives the split: DeepSpeed keeps one copy
on the first and one on the last stage, broadcasts it at start and all-reduces its gradient.
Layers are ``LayerSpec``s: a rank builds only its own stage's layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from toolkit.errors import UserError
from toolkit.loss import next_token_mean
from toolkit.models.loading import empty_model
from toolkit.models.pipeline.families import family_for
from toolkit.models.pipeline.layers import (
    DecoderLayerPipe,
    EmbeddingExtrasPipe,
    EmbeddingPipe,
    FinalPipe,
    HeadPipe,
    tied_head,
)
from toolkit.models.pipeline.partition import Split, split_layers
from toolkit.models.pipeline.weights import LazyModules, LiveModules

TIE_KEY = "embedding"


@dataclass(frozen=True)
class PlannedLayer:
    """One pipeline layer before it is built.

    Attributes:
        kind: The :mod:`~toolkit.models.pipeline.layers` class.
        modules: Local name -> HF module path.
        name: ``kind(HF classes)``, what summaries show and ``type:REGEX`` matches.
        params: Parameters the layer materialises.
        tie_key: Set on both ends of a tied embedding.
        forward_fn: The tied head's forward (DeepSpeed neither saves nor loads such a layer).
        kwargs: Extra constructor arguments of ``kind``.
    """

    kind: type[nn.Module]
    modules: dict[str, str]
    name: str
    params: int
    tie_key: str | None = None
    forward_fn: Callable | None = None
    kwargs: dict = field(default_factory=dict)


def plan_layers(model: nn.Module) -> list[PlannedLayer]:
    """The pipeline layers of an HF causal LM, in order.

    Args:
        model: A ``*ForCausalLM`` model; on the ``meta`` device is enough.

    Returns:
        The layers, each with the HF module paths it owns.

    Raises:
        UserError: Unsupported architecture or layout.
    """
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    family = family_for(model.config)
    paths = {id(module): path for path, module in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight
    if tied and getattr(head, "bias", None) is not None:
        raise UserError(
            "pipeline parallelism cannot split a tied LM head that has its own bias",
            "untie the embeddings (tie_word_embeddings=False) or train without pipeline stages",
        )
    blocks = _decoder_layers(model)
    rotary = _rotary_path(model, blocks)

    def planned(kind, modules, label, **extra) -> PlannedLayer:
        modules = {name: path for name, path in modules.items() if _exists(model, path)}
        owned = {id(p): p.numel() for path in modules.values() for p in model.get_submodule(path).parameters()}
        classes = ",".join(dict.fromkeys(  # the rotary module is a helper, not what the layer is
            type(model.get_submodule(p)).__name__ for name, p in modules.items() if name != "rotary"))
        return PlannedLayer(kind, modules, f"{label}({classes})", sum(owned.values()), **extra)

    embedding = dict(modules={"tokens": paths[id(embed)]}, kwargs={"position_fn": family.position_fn})
    plan = [planned(EmbeddingPipe, label="embedding", tie_key=TIE_KEY if tied else None, **embedding)]
    if family.embed_extras:
        plan.append(planned(EmbeddingExtrasPipe, family.embed_extras, "embedding_extras",
                            kwargs={"embed_fn": family.embed_fn}))
    for i, path in enumerate(blocks):
        sliding = _is_sliding(model.config, i)
        plan.append(planned(
            DecoderLayerPipe, {"layer": path, "rotary": rotary} if rotary else {"layer": path}, "decoder_layer",
            kwargs={"mask_fn": create_sliding_window_causal_mask if sliding else create_causal_mask},
        ))
    plan.append(planned(FinalPipe, family.final, "final"))
    if tied:
        plan.append(planned(EmbeddingPipe, label="tied_head", tie_key=TIE_KEY, forward_fn=tied_head, **embedding))
    else:
        plan.append(planned(HeadPipe, {"head": paths[id(head)]}, "head"))
    return plan


def plan_split(model_or_config, num_stages: int, partition: str = "parameters") -> Split:
    """The split :func:`to_pipeline` would make, computed without building any layer.

    For the launcher: print it, write it to ``run.json`` and reject a bad layout before any worker
    starts.

    Args:
        model_or_config: An HF causal LM or its config.
        num_stages: Pipeline stages.
        partition: ``parameters``, ``uniform`` or ``type:REGEX`` (see :mod:`.partition`).

    Returns:
        The :class:`Split`; ``str()`` of it is the per-stage summary.

    Raises:
        UserError: Unsupported model, bad method, or more stages than layers.
    """
    model = meta_model(model_or_config) if _is_config(model_or_config) else model_or_config
    return _split(plan_layers(model), num_stages, partition)


class HFPipelineModule(PipelineModule):
    """A ``PipelineModule`` whose split (``self.split``) was computed before building anything.

    DeepSpeed's ``parameters`` method counts parameters by building every layer on every rank;
    this class hands it the counts from the plan instead.
    """

    def __init__(self, layers, split: Split, hf_config=None, layer_modules=(), **kwargs):
        self.split = split  # read by _count_layer_params inside PipelineModule.__init__
        self.hf_config = hf_config  # what consolidation rebuilds the HF model from
        self.layer_modules = list(layer_modules)  # per layer: local name -> HF module path
        super().__init__(layers, num_stages=split.num_stages, partition_method=split.ds_partition_method, **kwargs)
        assert tuple(self.parts) == split.parts, (self.parts, split.parts)
        # DeepSpeed's fp32 gradient clipping (clip_grad_norm_ with the pipeline grid as mpu) sums
        # only the first stage's gradients into the "global" norm unless a parameter is flagged
        # model-parallel, so every stage would clip by stage 0's norm. Flag every parameter except
        # the last stage's copy of a tied one, so the norm sums each parameter exactly once.
        for param in self.parameters():
            param.model_parallel = not param.ds_pipe_replicated

    def _count_layer_params(self) -> list[int]:
        return list(self.split.weights)

    def hf_name(self, name: str) -> str:
        """The HF model's name for a module or parameter of this stage (``3.layer.mlp`` -> ``model.layers.2.mlp``)."""
        index, _, rest = name.partition(".")
        local, _, tail = rest.partition(".")
        if not index.isdigit() or local not in self.layer_modules[int(index)]:
            raise KeyError(f"{name!r} is not inside a pipeline layer built from HF modules")
        return ".".join(filter(None, [self.layer_modules[int(index)][local], tail]))


def to_pipeline(
    model_or_config,
    num_stages: int,
    *,
    weights: str | Path | Mapping[str, torch.Tensor] | None = None,
    partition: str = "parameters",
    activation_checkpoint_interval: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = next_token_mean,
    dtype: torch.dtype = torch.float32,
    seed: int = 1234,
) -> HFPipelineModule:
    """Convert an HF causal LM into a DeepSpeed ``PipelineModule`` computing the same function.

    Call it on every rank after ``deepspeed.init_distributed()``; pass the result to
    ``deepspeed.initialize(model=...)`` and train with ``engine.train_batch(data_iter)``, where
    each item of ``data_iter`` is ``((input_ids, attention_mask), labels)`` for one micro-batch,
    all of one shape (DeepSpeed sizes its stage-to-stage buffers from the first micro-batch):
    pad to a fixed sequence length. ``labels`` goes to ``loss_fn`` as given, so it may also be a
    tuple of tensors (e.g. labels and a normalising scale) for a custom ``loss_fn``.

    Args:
        model_or_config: An instantiated ``*ForCausalLM`` (its modules are reused, not copied:
            drop your own reference afterwards so the other stages' layers can be freed), or its
            config, in which case each rank builds only its stage's layers from ``weights``.
        num_stages: Pipeline stages; the world size must be a multiple (the rest is data parallel).
        weights: With a config: a ``save_pretrained`` directory (safetensors) or a state dict;
            None initialises randomly with transformers' init. Must be None with a model.
        partition: ``parameters`` (default), ``uniform`` or ``type:REGEX`` over layer names.
        activation_checkpoint_interval: Recompute activations in chunks of this many layers
            (0: off). Only chunks made of decoder layers are checkpointed.
        loss_fn: ``(logits, labels) -> loss``; default is HF's causal LM loss.
        dtype: Dtype of layers built from a config.
        seed: Seed of the random init of layers built from a config without weights.

    Returns:
        The module; ``module.split`` describes the layers and parameters of each stage.

    Raises:
        UserError: Unsupported architecture, bad partition, or weights that do not fit.
    """
    if _is_config(model_or_config):
        source = LazyModules(model_or_config, weights, dtype, seed)
    elif weights is not None:
        raise UserError("weights are only used when converting from a config", "pass the config, or drop weights=")
    else:
        source = LiveModules(model_or_config)
    plan = plan_layers(source.model)
    split = _split(plan, num_stages, partition)
    if isinstance(source, LazyModules) and plan[-1].tie_key:
        # a tied checkpoint may hold the matrix under either name
        head = {id(m): n for n, m in source.model.named_modules()}[id(source.model.get_output_embeddings())]
        source.aliases[f"{plan[0].modules['tokens']}.weight"] = f"{head}.weight"
    specs = [_spec(layer, source) for layer in plan]
    module = HFPipelineModule(
        specs, split, hf_config=source.model.config, layer_modules=[layer.modules for layer in plan], loss_fn=loss_fn,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=[DecoderLayerPipe.__name__],
    )
    source.release()
    return module


def parameter_names(config) -> dict[str, str]:
    """Each parameter's name in the pipeline module of ``config`` -> its name in the HF model.

    A layer's parameters are ``INDEX.LOCAL.NAME``, the tied embedding's ``tied_modules.KEY.LOCAL.NAME``
    (DeepSpeed's naming); the tied head has none of its own.
    """
    model = meta_model(config)
    names = {}
    for index, layer in enumerate(plan_layers(model)):
        if layer.forward_fn is not None:
            continue
        prefix = f"tied_modules.{layer.tie_key}" if layer.tie_key else str(index)
        for local, path in layer.modules.items():
            for name, _ in model.get_submodule(path).named_parameters():
                names[f"{prefix}.{local}.{name}"] = f"{path}.{name}"
    return names


def _spec(layer: PlannedLayer, source) -> LayerSpec:
    if layer.tie_key is None:
        return LayerSpec(layer.kind, source, layer.modules, **layer.kwargs)
    return TiedLayerSpec(layer.tie_key, layer.kind, source, layer.modules, forward_fn=layer.forward_fn,
                         tied_weight_attr=["tokens.weight"], **layer.kwargs)


def _split(plan: list[PlannedLayer], num_stages: int, partition: str) -> Split:
    return split_layers([l.name for l in plan], [l.params for l in plan], [l.tie_key for l in plan],
                        num_stages, partition)


def _is_config(obj) -> bool:
    from transformers import PretrainedConfig

    return isinstance(obj, PretrainedConfig)


def meta_model(config) -> nn.Module:
    """The model of ``config`` on the ``meta`` device, once its family is known to be supported."""
    family_for(config)  # fail on an unsupported architecture before building anything
    return empty_model(config)


def _exists(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(model.get_submodule(path), nn.Module)
    except AttributeError:  # OPT sets project_in/out and final_layer_norm to None when unused
        return False


def _decoder_layers(model: nn.Module) -> list[str]:
    """Paths of the repeated decoder blocks: the ModuleList of a class in ``_no_split_modules``."""
    block_classes = set(model._no_split_modules or ())
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
            type(child).__name__ in block_classes for child in module
        ):
            return [f"{path}.{i}" for i in range(len(module))]
    raise UserError(
        f"found no decoder layers ({', '.join(sorted(block_classes))}) in {type(model).__name__}",
        "this model's structure differs from its family's; train it without pipeline stages",
    )


def _rotary_path(model: nn.Module, blocks: list[str]) -> str | None:
    """The model-level rotary embedding module, if the family computes cos/sin once per forward."""
    found = [path for path, module in model.named_modules()
             if type(module).__name__.endswith("RotaryEmbedding") and not path.startswith(tuple(blocks))]
    if len(found) > 1:
        raise UserError(f"{type(model).__name__} has several rotary embeddings ({', '.join(found)})",
                        "train this model without pipeline stages")
    return found[0] if found else None


def _is_sliding(config, index: int) -> bool:
    """Whether decoder layer ``index`` uses sliding-window attention, as the HF model decides it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        if layer_types[index] not in ("full_attention", "sliding_attention"):
            raise UserError(f"pipeline parallelism does not support {layer_types[index]!r} layers",
                            "train this model without pipeline stages")
        return layer_types[index] == "sliding_attention"
    return getattr(config, "sliding_window", None) is not None
