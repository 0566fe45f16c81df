"""LoRA and QLoRA: peft adapters on a frozen base, the base optionally held in bitsandbytes 4 or 8 bits.

Only the adapters train, so only they (and their optimizer state) are checkpointed; ``final/`` is
the adapter in peft's own format, whose ``base_model_name_or_path`` is the full-precision base, so
peft, transformers and ``dstk export`` all find the base from it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.recipe import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"


def quantization_config(lora: LoraConfig, dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` that holds a QLoRA base, or None for plain LoRA."""
    if lora.quantize_base == "none":
        return None
    from transformers import BitsAndBytesConfig

    if lora.quantize_base == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def add_adapters(model: torch.nn.Module, lora: LoraConfig, base: str, seed: int) -> torch.nn.Module:
    """Wrap ``model`` as a peft model with fresh adapters; everything else is frozen.

    Args:
        base: what the adapter config names as its base: the full-precision model's directory
            (absolute) or hub id, never the quantized copy in memory.
        seed: the adapters' initialisation seed, reset here so that every layout (and ZeRO-3's
            partitioned loading, which draws random numbers of its own) starts from the same adapters.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # peft's message names the target modules it could not find
        from toolkit.errors import UserError

        raise UserError(f"lora.target_modules: {str(err).splitlines()[0]}",
                        "name modules the model has (e.g. q_proj, v_proj) or `all-linear`") from None
    model.peft_config["default"].base_model_name_or_path = base
    return model


def check_targets(config, lora: LoraConfig) -> None:
    """Refuse target modules the model does not have, before any worker starts.

    The adapters are placed on an empty (meta-device) copy of the model, which costs no memory.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    add_adapters(skeleton, lora, base="", seed=0)


def base_reference(path: str) -> str:
    """How an adapter names its base: an absolute directory, or the hub id as given."""
    local = Path(path)
    return str(local.resolve()) if local.is_dir() else path


def is_adapted(module: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(module, PeftModel)


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


def merge(adapter_dir: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Merge the adapter in ``adapter_dir`` into its full-precision base and save a plain HF model."""
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=dtype)
    model.merge_and_unload().save_pretrained(out, safe_serialization=True)
    return out
