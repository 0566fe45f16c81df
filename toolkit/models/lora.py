"""LoRA and QLoRA: peft adapters on a frozen base, the base optionally held in bitsandbytes 4 or 8 bits.

Only the adapters train, so only they (and their optimizer state) are checkpointed; ``final/`` is
the adapter in peft's own format, whose ``base_model_name_or_path`` is the full-precision base, so
peft, transformers and ``dstk export`` all find the base from it.

Adapters go on an HF model through ``get_peft_model``, or into the layers of a pipeline stage
through peft's ``inject_adapter_in_model``. Either way each adapter is initialised from the run's
seed and its module's name in the HF model, so that every layout starts from the same adapters.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from toolkit.errors import UserError
from toolkit.models.loading import empty_model, placement
from toolkit.models.pipeline.convert import meta_model
from toolkit.recipe import LoraConfig

PEFT_PREFIX = "base_model.model."  # what a PeftModel puts before the HF model's names


def quantization_config(lora: LoraConfig, dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` that holds a QLoRA base, or None for plain LoRA.

    The 4-bit blocks are stored in the training dtype so that ZeRO-3 can partition them.
    """
    if lora.quantize_base == "none":
        return None
    from transformers import BitsAndBytesConfig

    if lora.quantize_base == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def keep_standard_4bit_layout(model: torch.nn.Module) -> None:
    """Keep every 4-bit weight of a training model in bitsandbytes' standard layout.

    On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a 4-bit weight into a layout of its
    inference kernel at the first forward in eval mode without gradients, the evaluation before
    training. Under ZeRO-3 the repacked tensor is then released, and the weight is gathered again
    from its partition in the standard layout while the quantization state still describes the
    repacked one: training went on with wrong weights (a flat loss) and the checkpoint save failed
    in bitsandbytes. The standard layout computes the same products in training and evaluation.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def peft_config(lora: LoraConfig, base: str | None):
    """peft's ``LoraConfig`` for the recipe's block; ``base`` is what the saved adapter names as its base."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type="CAUSAL_LM",
                          base_model_name_or_path=base)


def _target_error(err: ValueError):
    # peft's message names the target modules it could not find
    return UserError(f"lora.target_modules: {str(err).splitlines()[0]}",
                     "name modules the model has (e.g. q_proj, v_proj) or `all-linear`")


def add_adapters(model: torch.nn.Module, lora: LoraConfig, base: str | None, seed: int) -> torch.nn.Module:
    """Wrap an HF model as a peft model with fresh adapters; everything else is frozen.

    Args:
        base: the full-precision model's directory (absolute) or hub id, never the quantized
            copy in memory.
        seed: the run's seed (see :func:`_init_adapters`).
    """
    from peft import get_peft_model

    config = peft_config(lora, base)
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise _target_error(err) from None
    model.peft_config["default"].base_model_name_or_path = base  # get_peft_model resets it
    _init_adapters(model, lambda name: name.removeprefix(PEFT_PREFIX), seed)
    return model


def adapt_pipeline(module, lora: LoraConfig, base: str, seed: int):
    """Put adapters into this rank's pipeline stage (an ``HFPipelineModule``), freezing the rest.

    The modules that get adapters are those the whole HF model would get (peft decides on an
    empty copy of it), named as they are in this stage.
    """
    from peft import inject_adapter_in_model

    wanted = adapted_modules(module.hf_config, lora)
    here = [name for name, _ in module.named_modules() if _hf_name_or_none(module, name) in wanted]
    config = peft_config(lora, base)
    if here:  # a stage may hold only layers without adapters (an embedding, a head)
        inject_adapter_in_model(dataclasses.replace(config, target_modules=here), module)
    module.peft_config = config  # what consolidation writes as adapter_config.json
    for name, param in module.named_parameters():
        param.requires_grad = ".lora_" in name
        if param.requires_grad:
            # as HFPipelineModule flags its own parameters: counted once in the gradient norm
            param.ds_pipe_replicated, param.model_parallel = False, True
    _init_adapters(module, module.hf_name, seed)
    return module


def _init_adapters(model: torch.nn.Module, hf_name: Callable[[str], str], seed: int) -> None:
    """peft's init (A: Kaiming uniform, B: zero), each A drawn from the seed and its module's HF name.

    A global draw order would differ between a whole model, a pipeline stage and ZeRO-3's
    partitioned loading; a per-module generator does not.
    """
    from peft.tuners.lora import LoraLayer

    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        generator = torch.Generator().manual_seed(seed + zlib.crc32(hf_name(name).encode()))
        for adapter in layer.lora_A.values():
            with torch.no_grad():
                weight = torch.empty_like(adapter.weight, device="cpu")
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
                adapter.weight.copy_(weight)
        for adapter in layer.lora_B.values():
            torch.nn.init.zeros_(adapter.weight)


def _hf_name_or_none(module, name: str) -> str | None:
    try:
        return module.hf_name(name)
    except KeyError:  # the pipeline's own containers, tied-layer copies
        return None


def adapted_modules(config, lora: LoraConfig) -> set[str]:
    """HF names of the modules that get adapters, decided by peft on an empty (meta-device) model.

    Raises:
        UserError: the target modules name nothing the model has; called before any worker starts.
    """
    from peft.tuners.lora import LoraLayer

    adapted = empty_adapted(empty_model(config), lora)
    return {name.removeprefix(PEFT_PREFIX) for name, m in adapted.named_modules() if isinstance(m, LoraLayer)}


def empty_adapted(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """The peft model of an empty (meta-device) ``model`` with the recipe's adapters (no memory).

    Raises:
        UserError: the target modules name nothing the model has.
    """
    return add_adapters(model, lora, base=None, seed=0)


def base_reference(path: str) -> str:
    """How an adapter names its base: an absolute directory, or the hub id as given."""
    local = Path(path)
    return str(local.resolve()) if local.is_dir() else path


def is_adapted(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained (adapter) weights, whole, on CPU; a collective call under ZeRO-3.

    Gathers only the adapters: the frozen base is never assembled.
    """
    import deepspeed

    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {name: p.detach().cpu().clone() for name, p in named}


def save_adapter(module: torch.nn.Module, state: dict[str, torch.Tensor], out: Path) -> None:
    """Write the adapter in peft format (safetensors) from ``state`` (see :func:`trainable_state`)."""
    module.save_pretrained(out, state_dict=state, safe_serialization=True)


def save_pipeline_adapter(hf_config, config, state: dict[str, torch.Tensor], out: Path) -> None:
    """Write adapter weights named as in the HF model (``model.layers.0...lora_A.default.weight``) in peft format.

    peft writes it from an empty (meta-device) peft model of the HF architecture, so the files are
    exactly those a whole-model run writes.
    """
    from peft import get_peft_model

    skeleton = get_peft_model(meta_model(hf_config), config)
    skeleton.peft_config["default"].base_model_name_or_path = config.base_model_name_or_path
    save_adapter(skeleton, {PEFT_PREFIX + key: tensor for key, tensor in state.items()}, out)


def reload(adapter_dir: Path, lora: LoraConfig, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A saved adapter on the base its config names, held as the run trained it (quantized as in
    ``lora.quantize_base``, in the 4-bit layout training keeps): the model the run's engine was."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, quantization_config=quantization_config(lora, dtype),
                                                 **placement())
    keep_standard_4bit_layout(model)
    return PeftModel.from_pretrained(model, adapter_dir)


def merge(adapter_dir: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Merge the adapter in ``adapter_dir`` into its full-precision base and save a plain HF model."""
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=dtype)
    model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    return out
