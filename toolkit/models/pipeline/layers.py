"""The pipeline layers: thin wrappers that own HF modules and pass tensors from layer to layer.

Between layers (and so between stages) flows the tuple ``(hidden, attention_mask, position_ids)``:
hidden states (batch, seq, width) float, the 2D padding mask (batch, seq) int64 and positions
(batch, seq) int64. Each decoder layer rebuilds its 4D attention mask and its rotary cos/sin from
the mask and positions instead of receiving them: DeepSpeed marks every floating tensor it receives
as requiring grad and must send a gradient back for each, so shipping cos/sin or a float mask
would double the traffic for tensors that need no gradient; rebuilding them costs O(seq x width)
per layer, far below the layer's own matmuls. The last layers pass plain tensors: hidden states,
then logits.

Every wrapper owns its HF modules under local names; ``modules`` (local name -> path in the HF
model) is what maps a pipeline checkpoint back to HF ``state_dict`` keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PipeLayer(nn.Module):
    """Base: registers the HF modules a layer owns, taken from a module source.

    Args:
        source: Gives ``module(path)``: the HF module at ``path``, with its weights.
        modules: Local name -> HF module path. Names become attributes (``self.layer``).
    """

    def __init__(self, source, modules: dict[str, str]):
        super().__init__()
        for name, path in modules.items():
            self.add_module(name, source.module(path))


class EmbeddingPipe(PipeLayer):
    """First layer: ``(input_ids, attention_mask)`` -> ``(hidden, attention_mask, position_ids)``.

    Owns only the token embedding (``tokens``), so that when it is tied to the LM head the copy
    the last stage holds is just that matrix. Its forward is the module's own: DeepSpeed saves a
    tied layer's weights only where it runs without a ``forward_fn``.
    """

    def __init__(self, source, modules: dict[str, str], position_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(source, modules)
        self.position_fn = position_fn

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]):
        input_ids, attention_mask = inputs
        attention_mask = attention_mask.long()
        return self.tokens(input_ids), attention_mask, self.position_fn(attention_mask)


def tied_head(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """LM head that reuses the token embedding matrix (the last stage's tied copy)."""
    return F.linear(hidden, embedding.tokens.weight)


class EmbeddingExtrasPipe(PipeLayer):
    """What a family adds after the token embedding (position embeddings, projection, dropout)."""

    def __init__(self, source, modules: dict[str, str], embed_fn):
        super().__init__(source, modules)
        self.embed_fn = embed_fn

    def forward(self, inputs):
        hidden, attention_mask, positions = inputs
        return self.embed_fn(self, hidden, positions), attention_mask, positions


class DecoderLayerPipe(PipeLayer):
    """One HF decoder layer (``layer``), plus the rotary module (``rotary``) where the family has one.

    Args:
        source: See :class:`PipeLayer`.
        modules: ``{"layer": path}`` and optionally ``{"rotary": path}``.
        mask_fn: transformers' mask builder for this layer's attention type
            (``create_causal_mask`` or ``create_sliding_window_causal_mask``).
    """

    def __init__(self, source, modules: dict[str, str], mask_fn):
        super().__init__(source, modules)
        self.config = source.config
        self.mask_fn = mask_fn

    def forward(self, inputs):
        hidden, attention_mask, positions = inputs
        mask = self.mask_fn(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
            position_ids=positions,
        )
        extra = {"position_embeddings": self.rotary(hidden, positions)} if hasattr(self, "rotary") else {}
        out = self.layer(hidden, attention_mask=mask, position_ids=positions, **extra)
        return (out[0] if isinstance(out, tuple) else out), attention_mask, positions


class FinalPipe(PipeLayer):
    """The modules after the last decoder layer (final norm, OPT's projection), in order."""

    def forward(self, inputs):
        hidden = inputs[0]
        for module in self.children():
            hidden = module(hidden)
        return hidden


class HeadPipe(PipeLayer):
    """An untied LM head (``head``): hidden -> logits (batch, seq, vocab)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)
