"""Loading any HF causal LM for training: a local directory or hub id, ZeRO-3 aware.

Under ZeRO-3 the model must be created partitioned (``zero.Init``) so that a model larger than one
rank's memory can load; transformers does that inside ``from_pretrained`` while an
``HfDeepSpeedConfig`` for a stage-3 config is alive, so :func:`load_for_training` keeps one alive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import UserError
from toolkit.models.presets import PRESETS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelRef:
    """Where a recipe's ``model`` comes from: ``kind`` is preset, local or hub."""

    kind: str
    name: str


def resolve_model(spec: str, trust_remote_code: bool = False) -> ModelRef:
    """Classify ``spec`` without loading it, failing early on a preset or path that cannot exist,
    and on a local directory that is not a causal LM in safetensors."""
    if spec in PRESETS:
        return ModelRef("preset", spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {path} has no config.json",
                            "point `model` at a directory saved with save_pretrained")
        check_causal_lm(path, trust_remote_code=trust_remote_code)
        check_weights(path)
        return ModelRef("local", str(path))
    if spec.startswith(("tiny-", ".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model {spec!r} is neither a built-in preset nor an existing directory",
                        f"presets: {', '.join(PRESETS)}")
    return ModelRef("hub", spec)


def check_causal_lm(model_dir: Path, *, trust_remote_code: bool = False) -> None:
    """Raise :class:`UserError` unless ``model_dir`` holds the config of a causal language model.

    By the config's ``architectures``, not its ``model_type``: transformers maps encoders such as
    BERT to a causal-LM class too, which would train an encoder as a decoder without complaint.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json (model config)", "give a Hugging Face model directory or a dstk run")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})", "repair or regenerate the model config") from None
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    if trust_remote_code and "AutoModelForCausalLM" in (config.get("auto_map") or {}):
        return
    if architectures and not causal_classes.intersection(architectures):
        raise UserError(
            f"{model_dir}: {', '.join(architectures)} is not a causal language model",
            "dstk trains, exports and runs decoder-only LMs (architectures ending in ForCausalLM or LMHeadModel)",
        )
    if not architectures and config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"{model_dir}: model_type {config.get('model_type')!r} has no causal-LM class in transformers",
            "pass a decoder-only LM, or --trust-remote-code if its class ships with the model",
        )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights(model_dir: Path) -> None:
    """Refuse a model directory whose weights are pickles or whose safetensors files are cut short.

    Unpickling a file can run arbitrary code, so dstk reads weights from safetensors only. A
    safetensors file states its own length (an 8-byte header size, a JSON header, then tensor data
    at the offsets the header lists), so truncation is found from the header alone.
    """
    import struct

    model_dir = Path(model_dir)
    tensors = sorted(model_dir.glob("*.safetensors"))
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not tensors and pickles:
        raise UserError(f"model directory {model_dir} holds pickle weights only ({pickles[0]}); dstk loads "
                        "safetensors only, since unpickling can run code",
                        "convert it once where you trust the file: AutoModelForCausalLM.from_pretrained(DIR)"
                        ".save_pretrained(NEW_DIR)")
    for path in tensors:
        size = path.stat().st_size
        try:
            with path.open("rb") as handle:
                (header_len,) = struct.unpack("<Q", handle.read(8))
                if header_len > size:
                    raise ValueError("header size beyond the end of the file")
                header = json.loads(handle.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, struct.error) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err})",
                            "re-save or re-download the model") from None
        if size != 8 + header_len + end:
            raise UserError(f"{path} is truncated or corrupt: {size} bytes, its header describes "
                            f"{8 + header_len + end}", "re-save or re-download the model")


def empty_model(config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of ``config`` on the ``meta`` device: its structure and sizes, without memory.

    Raises:
        UserError: transformers has no causal-LM class for the config (e.g. an encoder model).
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise UserError(f"model type {config.model_type!r} is not a causal language model: "
                        f"{str(err).splitlines()[0]}", "pass a decoder-only causal LM") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Padding never reaches the loss (labels are -100 there), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def placement() -> dict[str, Any]:
    """``from_pretrained``'s placement: the whole model on this process's GPU when there is one.

    One device, never "auto": the same weights must land on the same device in every process that
    loads them, and bitsandbytes quantizes on the device the weights land on.
    """
    return {"device_map": {"": torch.cuda.current_device()}} if torch.cuda.is_available() else {}


def load_for_training(path: str, ds_config: dict[str, Any], precision: str, trust_remote_code: bool = False,
                      quantization=None, attention: str | None = None) -> tuple[torch.nn.Module, Any]:
    """Load the model in ``path`` the way ``ds_config`` will train it.

    ``quantization`` (a ``BitsAndBytesConfig``) loads the weights quantized, for a frozen QLoRA base;
    ``attention`` names transformers' attention implementation (None: the model's default).

    Returns:
        The model and a handle that must stay referenced while the model lives (the
        ``HfDeepSpeedConfig`` that tells transformers to partition under ZeRO-3; else None).
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    keep_alive = HfDeepSpeedConfig(ds_config) if zero3 else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[precision], trust_remote_code=trust_remote_code, quantization_config=quantization,
            use_safetensors=True, **({"attn_implementation": attention} if attention else {}),
        )  # no device_map: ZeRO-3 refuses one; bitsandbytes quantizes on the current GPU, the rank's own
    except (OSError, ValueError) as err:
        raise UserError(f"could not load model {path!r}: {str(err).splitlines()[0]}",
                        "pass a directory saved with save_pretrained or a reachable hub id") from None
    model.config.use_cache = False  # the KV cache only costs memory while training
    return model, keep_alive
