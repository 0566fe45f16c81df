"""What transformers does not declare about a family: the small adapter per supported family.

Most of a causal LM's pipeline shape comes from what transformers declares on every model: the
token embedding (``get_input_embeddings``), the LM head (``get_output_embeddings``), the repeated
decoder block (``_no_split_modules``), the tie (``config.tie_word_embeddings``), the rotary module
and the per-layer attention type (``config.layer_types`` / ``config.sliding_window``). A
:class:`Family` adds the rest: which modules run between the token embedding and the first
decoder layer, which run between the last decoder layer and the head, and how position ids follow
from the attention mask. Module paths are relative to the ``*ForCausalLM`` root, exactly as in the
model's ``state_dict`` keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from toolkit.errors import UserError


def arange_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..S-1 for every row, as HF computes them when no position ids are given.

    Args:
        attention_mask: (batch, seq) 1 for real tokens, 0 for padding.

    Returns:
        (batch, seq) int64 positions; contiguous, because the pipeline sends it between stages.
    """
    batch, seq = attention_mask.shape
    return torch.arange(seq, device=attention_mask.device).expand(batch, seq).contiguous()


def cumsum_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """OPT's positions: count only real tokens, padding gets -1 (OPT adds its offset of 2 later).

    Args:
        attention_mask: (batch, seq) 1 for real tokens, 0 for padding.

    Returns:
        (batch, seq) int64 positions.
    """
    mask = attention_mask.long()
    return torch.cumsum(mask, dim=1) * mask - 1


def dropout_only(m: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Embedding dropout (Phi, GPT-NeoX)."""
    return m.dropout(hidden)


def learned_positions(m: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """GPT-2: add the learned position embedding, then embedding dropout."""
    return m.dropout(hidden + m.positions(positions))


def opt_positions(m: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """OPT: optional projection to the model width, then the learned (offset) position embedding."""
    if hasattr(m, "project_in"):
        hidden = m.project_in(hidden)
    # OPT's module takes the mask first; it is only used when position ids are not given
    return hidden + m.positions(None, position_ids=positions)


@dataclass(frozen=True)
class Family:
    """The part of a family's structure that transformers leaves implicit.

    Attributes:
        name: Family name shown in errors and summaries.
        model_types: ``config.model_type`` values this adapter handles.
        final: Local name -> module path, applied in order after the last decoder layer (final
            norm, OPT's ``project_out``). Paths that a given config leaves ``None`` are skipped.
        embed_extras: Local name -> module path of the modules ``embed_fn`` uses after the token
            embedding (position embeddings, embedding dropout, projections); empty for none.
        embed_fn: ``(module holding embed_extras, hidden, positions) -> hidden``.
        position_fn: ``attention_mask -> position_ids``, identical to the HF model's default.
        unsupported: ``config attribute -> value the pipeline requires``; anything else is a
            UserError (e.g. OPT's random LayerDrop, which a pipeline stage cannot skip in step).
    """

    name: str
    model_types: tuple[str, ...]
    final: dict[str, str]
    embed_extras: dict[str, str] = field(default_factory=dict)
    embed_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    position_fn: Callable[[torch.Tensor], torch.Tensor] = arange_positions
    unsupported: dict[str, object] = field(default_factory=dict)


FAMILIES: tuple[Family, ...] = (
    # LLaMA-style: embed_tokens -> layers -> norm; Gemma's sqrt(hidden) scale lives in its embedding
    # module and Mistral/Qwen2 sliding windows in their configs, so one adapter covers all four.
    Family("llama", ("llama", "mistral", "qwen2", "gemma"), final={"norm": "model.norm"}),
    Family(
        "phi",
        ("phi",),
        final={"norm": "model.final_layernorm"},
        embed_extras={"dropout": "model.embed_dropout"},
        embed_fn=dropout_only,
    ),
    Family(
        "gpt_neox",
        ("gpt_neox",),
        final={"norm": "gpt_neox.final_layer_norm"},
        embed_extras={"dropout": "gpt_neox.emb_dropout"},
        embed_fn=dropout_only,
    ),
    Family(
        "gpt2",
        ("gpt2",),
        final={"norm": "transformer.ln_f"},
        embed_extras={"positions": "transformer.wpe", "dropout": "transformer.drop"},
        embed_fn=learned_positions,
    ),
    Family(
        "opt",
        ("opt",),
        final={"norm": "model.decoder.final_layer_norm", "project_out": "model.decoder.project_out"},
        embed_extras={"project_in": "model.decoder.project_in", "positions": "model.decoder.embed_positions"},
        embed_fn=opt_positions,
        position_fn=cumsum_positions,
        unsupported={"layerdrop": 0.0},
    ),
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` the pipeline converter accepts, sorted."""
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(config) -> Family:
    """The adapter for a model config.

    Args:
        config: A transformers ``PretrainedConfig``.

    Returns:
        The matching :class:`Family`.

    Raises:
        UserError: The architecture is not supported, or the config uses a feature the pipeline
            cannot reproduce.
    """
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            for attr, required in family.unsupported.items():
                if getattr(config, attr, required) != required:
                    raise UserError(
                        f"pipeline parallelism cannot train a {model_type} model with "
                        f"{attr}={getattr(config, attr)!r}",
                        f"set {attr}={required!r} in the model config, or train without pipeline stages",
                    )
            return family
    raise UserError(
        f"pipeline parallelism does not support model type {model_type!r}",
        f"supported: {', '.join(supported_model_types())}; or train with parallel.pipeline_stages=1",
    )
