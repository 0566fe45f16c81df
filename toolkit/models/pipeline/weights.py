"""Where pipeline layers get their HF modules: a live model, or lazily from a config plus weights.

A :class:`LiveModules` hands out the modules of an instantiated model as they are (same
parameters, so the pipeline computes exactly the model's function). A :class:`LazyModules`
builds the model on the ``meta`` device (no memory), and materialises only the modules a stage
asks for, reading just their tensors from a ``save_pretrained`` directory or a state dict. That
is what lets each rank hold only its own stage.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from toolkit.errors import UserError


class LiveModules:
    """Modules of an instantiated HF model, shared, not copied.

    Args:
        model: A ``*ForCausalLM`` model.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def release(self) -> None:
        """Drop the model once the stage is built, so the other stages' layers can be freed."""
        self.model = None


class CheckpointTensors(Mapping):
    """Read-on-demand view of the tensors in a ``save_pretrained`` directory (safetensors)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {key: directory / name for key, name in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self._files = dict.fromkeys(f.keys(), single)
        else:
            raise UserError(
                f"no safetensors weights in {directory}",
                "save the model with save_pretrained (safetensors), or pass the loaded model instead",
            )

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[key], framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


class LazyModules:
    """Modules built on demand from a config, with weights read per module.

    Args:
        config: The HF model config.
        weights: A ``save_pretrained`` directory, a state dict, or None for a random init with
            transformers' own per-module initialisation.
        dtype: Dtype of the built modules.
        seed: With ``weights=None``, each module's init is seeded from ``seed`` and its path, so
            every rank that builds a module (its stage's data-parallel replicas, both ends of a
            tie) gets the same values without touching the global RNG.

    Attributes:
        aliases: Key -> key to read instead when the first is absent (the token embedding of a
            tied checkpoint that kept only ``lm_head.weight``); set by the converter.
    """

    def __init__(self, config, weights: str | Path | Mapping[str, torch.Tensor] | None,
                 dtype: torch.dtype, seed: int):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.config = self.model.config
        self.dtype = dtype
        self.seed = seed
        self.aliases: dict[str, str] = {}
        self.tensors = CheckpointTensors(weights) if isinstance(weights, (str, Path)) else weights

    def module(self, path: str) -> nn.Module:
        module = copy.deepcopy(self.model.get_submodule(path)).to_empty(device="cpu")
        if self.tensors is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + zlib.crc32(path.encode()))
                module.apply(self.model._init_weights)
            return module
        # Non-persistent buffers (rotary inv_freq, Gemma's embed scale) are not in any checkpoint;
        # transformers' own init recomputes them (it may also init weights: loaded over below).
        for sub in module.modules():
            if sub._non_persistent_buffers_set:
                self.model._init_weights(sub)
        module.load_state_dict({key: self._read(f"{path}.{key}") for key in module.state_dict()})
        return module

    def _read(self, key: str) -> torch.Tensor:
        prefix = self.model.base_model_prefix + "."
        # hub checkpoints of older families (GPT-2) store base-model keys without the prefix
        for candidate in (key, self.aliases.get(key), key.removeprefix(prefix)):
            if candidate is not None and candidate in self.tensors:
                tensor = self.tensors[candidate]
                return tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        raise UserError(
            f"weight {key!r} is missing from the checkpoint",
            "load the model with from_pretrained and convert the loaded model instead",
        )

    def release(self) -> None:
        """Drop the meta model and the weights handle once the stage is built."""
        self.model = self.tensors = None
