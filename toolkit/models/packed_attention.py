"""Attention over packed records whose other layers see real tokens only.

A packed micro-batch (``toolkit.data.packing``) reaches the model as one flat sequence of its
records' real tokens, ``(1, N)``: embeddings, norms, projections, MLPs and the LM head, nearly all
of the compute, run on those N tokens and no padding. Attention alone needs rows, so this
implementation gathers queries, keys and values into the plan's rows of ``seq_len`` slots (empty
slots read zeros), runs the model family's own attention there under the block-diagonal mask, and
gathers the outputs back; rows end in padding, which only attention now computes.

Without a plan (evaluation, generation, any padded batch) the model attends as before: its own
eager attention on a CPU, where it compiles into faster code than sdpa's kernel, sdpa elsewhere.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from toolkit.errors import UserError

NAME = "dstk_packed"


def _own_attention(module: torch.nn.Module):
    """The attention the model would use unpacked: its family's eager function on a CPU, else sdpa."""
    if not torch.cuda.is_available():
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def packed_attention(module, query, key, value, attention_mask, packed_rows=None, **kwargs):
    """transformers' attention interface; ``packed_rows`` is ``(row_slots, token_slots)``: for every
    row slot the token it holds (N for padding), for every token its slot."""
    attend = _own_attention(module)
    if packed_rows is None:
        return attend(module, query, key, value, attention_mask, **kwargs)
    row_slots, token_slots = packed_rows
    rows, width = attention_mask.shape[0], attention_mask.shape[-1]

    def to_rows(states: torch.Tensor) -> torch.Tensor:  # (1, heads, N, dim) -> (rows, heads, width, dim)
        padded = F.pad(states[0], (0, 0, 0, 1))  # slot N: a zero for the empty slots to read
        return padded[:, row_slots].unflatten(1, (rows, width)).transpose(0, 1)

    out, _ = attend(module, to_rows(query), to_rows(key), to_rows(value), attention_mask, **kwargs)
    return out.flatten(0, 1)[token_slots][None], None  # (rows, width, heads, dim) -> (1, N, heads, dim)


def check_packable(model: torch.nn.Module) -> None:
    """Refuse a model whose attention is not transformers' attention interface: it has no family
    attention to run in rows, nor a way to take this one (checked on a meta-device copy).

    Raises:
        UserError: with the reason and the way out.
    """
    family = sys.modules[type(model).__module__]
    if not (model._can_set_attn_implementation() and hasattr(family, "eager_attention_forward")):
        raise UserError(f"train.packing needs a model whose attention goes through transformers' attention "
                        f"interface; {type(model).__name__} ({family.__name__}) has its own",
                        "set train.packing=false (train.group_by_length still trims the padding)")


def use_packed_attention(model: torch.nn.Module) -> None:
    """Let ``model`` (one :func:`check_packable` accepts) take packed micro-batches, and still any
    padded one."""
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    AttentionInterface.register(NAME, packed_attention)
    # the mask a padded batch needs is that of the attention it falls back to
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa" if torch.cuda.is_available() else "eager"])
    model.set_attn_implementation(NAME)
