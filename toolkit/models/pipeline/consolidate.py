"""Pipeline checkpoint (``layer_XX-model_states.pt`` files) -> Hugging Face model.

DeepSpeed saves one file per pipeline layer holding that layer's ``state_dict``. The layer plan,
rebuilt from the model config, says which HF module each local name stands for, so the files map
back to HF keys one to one. The tied head is not saved (DeepSpeed skips layers with a
``forward_fn``), and needs not be: ``save_pretrained`` writes the tied matrix once and
``from_pretrained`` ties it again.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from toolkit.errors import UserError
from toolkit.models.pipeline.convert import meta_model, plan_layers


def consolidate(checkpoint_dir: str | Path, config, output_dir: str | Path | None = None, *,
                tag: str | None = None) -> dict[str, torch.Tensor]:
    """Turn a pipeline checkpoint into an HF state dict, and optionally a model directory.

    Args:
        checkpoint_dir: The folder given to ``engine.save_checkpoint`` (the ``latest`` file
            picks the tag) or one tag's folder.
        config: The HF config of the trained model (a ``PretrainedConfig`` or a directory).
        output_dir: If given, write a ``save_pretrained`` model (config and safetensors, tie
            restored) there; tokenizer files are the caller's. Under torch.distributed only
            global rank 0 may do this: transformers' ``save_pretrained`` writes nothing elsewhere.
        tag: Checkpoint tag inside ``checkpoint_dir``; default is the one ``latest`` names.

    Returns:
        The HF state dict (a tied head appears only under the embedding's key).

    Raises:
        UserError: No checkpoint, a missing or extra layer file, or weights that do not match
            the config.
    """
    if output_dir is not None and dist.is_initialized() and dist.get_rank() != 0:
        raise RuntimeError(f"consolidate(output_dir=...) on rank {dist.get_rank()}: "
                           "save_pretrained writes only on global rank 0, call it there")
    folder, model = _open(checkpoint_dir, config, tag)
    state = _hf_state(folder, model)
    expected = model.state_dict(keep_vars=True)
    missing = expected.keys() - state.keys() - _tied_duplicates(expected)
    unexpected = state.keys() - expected.keys()
    if missing or unexpected:
        raise _mismatch(folder, f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    if output_dir is not None:
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        model.save_pretrained(output_dir)
    return state


def consolidate_adapter(checkpoint_dir: str | Path, config, *, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA adapter weights of a pipeline checkpoint saved without its frozen base, under HF names.

    Returns:
        ``{"model.layers.0.self_attn.q_proj.lora_A.default.weight": tensor, ...}``.

    Raises:
        UserError: No checkpoint, a missing layer file, or no adapter weights in it.
    """
    folder, model = _open(checkpoint_dir, config, tag)
    state = {key: tensor for key, tensor in _hf_state(folder, model).items() if ".lora_" in key}
    if not state:
        raise UserError(f"checkpoint {folder} holds no LoRA adapter weights", "was it saved by a LoRA run?")
    return state


def _open(checkpoint_dir: str | Path, config, tag: str | None):
    """The checkpoint's tag folder and the meta-device model of ``config`` (a config or its directory)."""
    if isinstance(config, (str, Path)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(config)
    return _tag_folder(Path(checkpoint_dir), tag), meta_model(config)


def _hf_state(folder: Path, model) -> dict[str, torch.Tensor]:
    """Every tensor in the layer files of ``folder``, under the HF model's names."""
    state: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(plan_layers(model)):
        if layer.forward_fn is not None:
            continue
        files = sorted(folder.glob(f"layer_{index:02d}-*model_states.pt"))
        if len(files) != 1:
            raise UserError(
                f"expected one file for pipeline layer {index} in {folder}, found {len(files)}",
                "consolidate a complete pipeline checkpoint (without tensor-parallel shards) of this model",
            )
        for key, tensor in torch.load(files[0], map_location="cpu", weights_only=True).items():
            local, _, rest = key.partition(".")
            if local not in layer.modules:
                raise _mismatch(folder, f"{files[0].name} holds {key!r}, the config's layer {index} is {layer.name}")
            state[f"{layer.modules[local]}.{rest}"] = tensor
    return state


def _mismatch(folder: Path, detail: str) -> UserError:
    return UserError(f"checkpoint {folder} does not match the model config ({detail})",
                     "pass the config of the model that was trained")


def _tag_folder(checkpoint_dir: Path, tag: str | None) -> Path:
    latest = checkpoint_dir / "latest"
    if tag is None and latest.is_file():
        tag = latest.read_text().strip()
    folder = checkpoint_dir / tag if tag is not None else checkpoint_dir
    if not any(folder.glob("layer_*-model_states.pt")):
        raise UserError(f"no pipeline checkpoint (layer_XX-model_states.pt) in {folder}",
                        "point at the folder given to engine.save_checkpoint, or one of its tags")
    return folder


def _tied_duplicates(state: dict[str, torch.Tensor]) -> set[str]:
    """Keys naming a parameter already listed under an earlier key (the tied head)."""
    seen, duplicates = set(), set()
    for key, tensor in state.items():
        if id(tensor) in seen:
            duplicates.add(key)
        seen.add(id(tensor))
    return duplicates
