"""Choosing which pipeline layers each stage owns, and describing the choice.

Three methods, named as in DeepSpeed: ``parameters`` (balance parameter counts, the default),
``uniform`` (balance layer counts) and ``type:REGEX`` (balance the layers whose name matches REGEX,
case-insensitive, e.g. ``type:decoder_layer``; the others ride along). The split is computed here,
without building any layer, with DeepSpeed's own partitioners, and handed to DeepSpeed as the
per-layer weights of its ``parameters`` method, so the summary printed here is the split DeepSpeed
uses.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from deepspeed.runtime.utils import partition_balanced, partition_uniform

from toolkit.errors import UserError

METHODS = ("parameters", "uniform", "type:REGEX")


@dataclass(frozen=True)
class Split:
    """Pipeline layers and their assignment to stages.

    Attributes:
        method: The partition method as given.
        names: Per layer, ``kind(HF class)``, e.g. ``decoder_layer(LlamaDecoderLayer)``.
        params: Per layer, the parameters it materialises (a tied head counts its matrix).
        tie_keys: Per layer, the tie key or None; a stage holding both ends of a tie builds it once.
        weights: Per layer, what the balancing used (``params``, or 1/0 for ``type:`` matches).
        parts: Stage ``s`` owns layers ``parts[s]`` to ``parts[s + 1] - 1``.
    """

    method: str
    names: tuple[str, ...]
    params: tuple[int, ...]
    tie_keys: tuple[str | None, ...]
    weights: tuple[int, ...]
    parts: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.parts) - 1

    @property
    def ds_partition_method(self) -> str:
        """What DeepSpeed's ``partition_method`` is given (with ``weights`` as layer counts)."""
        return "uniform" if self.method == "uniform" else "parameters"

    def stage_layers(self, stage: int) -> range:
        return range(self.parts[stage], self.parts[stage + 1])

    def stage_params(self, stage: int) -> int:
        """Parameters the ranks of ``stage`` hold, a tied module counted once per stage."""
        return self._count(self.stage_layers(stage))

    def total_params(self) -> int:
        """Parameters of the whole model, a tied module counted once."""
        return self._count(range(len(self.names)))

    def _count(self, layers: range) -> int:
        seen, total = set(), 0
        for i in layers:
            if self.tie_keys[i] is None or self.tie_keys[i] not in seen:
                total += self.params[i]
            seen.add(self.tie_keys[i])
        return total

    def to_dict(self) -> dict:
        """The split as plain data, for ``run.json``."""
        return {
            "method": self.method,
            "num_stages": self.num_stages,
            "total_params": self.total_params(),
            "stages": [
                {
                    "stage": s,
                    "layers": [self.parts[s], self.parts[s + 1] - 1],
                    "layer_names": [self.names[i] for i in self.stage_layers(s)],
                    "params": self.stage_params(s),
                }
                for s in range(self.num_stages)
            ],
        }

    def __str__(self) -> str:
        lines = [f"pipeline split: {self.num_stages} stages by {self.method}, {self.total_params():,} parameters"]
        for s in range(self.num_stages):
            runs = [(name, len(list(group))) for name, group in itertools.groupby(self.names[i] for i in self.stage_layers(s))]
            layers = ", ".join(name if n == 1 else f"{name} x{n}" for name, n in runs)
            span = f"{self.parts[s]}-{self.parts[s + 1] - 1}"
            lines.append(f"  stage {s}  layers {span:<7} {self.stage_params(s):>14,} params  {layers}")
        return "\n".join(lines)


def split_layers(names, params, tie_keys, num_stages: int, method: str = "parameters") -> Split:
    """Assign pipeline layers to ``num_stages`` stages.

    Args:
        names: Per layer name (what ``type:REGEX`` matches).
        params: Per layer parameter count.
        tie_keys: Per layer tie key or None.
        num_stages: Number of pipeline stages.
        method: ``parameters``, ``uniform`` or ``type:REGEX``.

    Returns:
        The :class:`Split`.

    Raises:
        UserError: Unknown method, a regex that is invalid or matches no layer, or more stages
            than layers.
    """
    names, params = tuple(names), tuple(params)
    if num_stages < 1 or num_stages > len(names):
        raise UserError(
            f"cannot split {len(names)} pipeline layers into {num_stages} stages",
            f"use 1 to {len(names)} pipeline stages for this model",
        )
    if method == "uniform":
        weights = (1,) * len(names)
        parts = partition_uniform(num_items=len(names), num_parts=num_stages)
    elif method == "parameters" or method.startswith("type:"):
        weights = params if method == "parameters" else _matches(names, method.removeprefix("type:"))
        parts = partition_balanced(weights=list(weights), num_parts=num_stages)
    else:
        raise UserError(f"unknown pipeline partition method {method!r}", f"use one of: {', '.join(METHODS)}")
    return Split(method, names, params, tuple(tie_keys), tuple(weights), tuple(int(p) for p in parts))


def _matches(names: tuple[str, ...], pattern: str) -> tuple[int, ...]:
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise UserError(f"invalid pipeline partition regex {pattern!r}: {err}", "fix the regex after 'type:'") from None
    weights = tuple(int(bool(regex.search(name))) for name in names)
    if not any(weights):
        raise UserError(
            f"pipeline partition 'type:{pattern}' matches no layer",
            f"layer names: {', '.join(dict.fromkeys(names))}",
        )
    return weights
